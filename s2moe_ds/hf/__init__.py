"""Hugging Face export (optional extra: pip install -e '.[hf]'): our models and tokenizers behind
Transformers' interfaces, and the export launch/consolidate.py --format hf writes. Importing this
package registers model_type 's2moe' with the Auto classes, so that an export loads with
AutoModelForCausalLM.from_pretrained(path) and no trust_remote_code. `import s2moe_ds` alone
does not: training never imports Transformers. lm-evaluation-harness: s2moe_ds.hf.lm_eval."""

from .export import LM_EVAL_TASK, export_hf, write_lm_eval_task
from .modeling import S2MoEConfig, S2MoEForCausalLM, register
from .tokenizer import S2MoETokenizer

register()

__all__ = ["LM_EVAL_TASK", "S2MoEConfig", "S2MoEForCausalLM", "S2MoETokenizer", "export_hf", "register", "write_lm_eval_task"]
