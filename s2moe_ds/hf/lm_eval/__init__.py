"""lm-evaluation-harness on our export without trust_remote_code: the model name `s2moe`.

    python -m s2moe_ds.hf.lm_eval --model s2moe --model_args pretrained=runs/tiny/hf,dtype=float32 \\
        --include_path runs/tiny/hf-lm_eval_tasks --tasks s2moe_text --device cpu --batch_size 32

runs lm_eval's own command line (every flag of `lm_eval`) with `s2moe` registered; from Python,
`import s2moe_ds.hf.lm_eval` registers it for `lm_eval.simple_evaluate(model="s2moe", ...)`.
lm_eval has no plugin discovery of its own, so its bare `lm_eval` command does not know the name.

`s2moe` is lm_eval's Hugging Face model (HFLM: batching, rolling windows, generation) with the
config, model and tokenizer read by s2moe_ds's classes, never by Transformers' Auto classes: a .py
file or auto_map in the folder is ignored, so an export from someone else runs none of its Python.
Its config.json is checked against model.safetensors' shapes before the model is built (modeling).

A task folder is another matter: lm_eval runs the Python its YAML names (`!function`). The task
folder consolidate writes lies beside the export (<out>-lm_eval_tasks), never in it, and the command
refuses an --include_path folder holding Python or YAML that runs it (task_sources). Never
--include_path a task folder you did not write.
"""

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ...config import ConfigError
from ..modeling import MODEL_TYPE, S2MoEConfig, S2MoEForCausalLM
from ..tokenizer import S2MoETokenizer

MODEL_NAME = "s2moe"


@register_model(MODEL_NAME)
class S2MoELM(HFLM):
    """HFLM whose loading goes through S2MoEConfig, S2MoEForCausalLM and S2MoETokenizer.
    `--model_args` are HFLM's (pretrained, dtype, batch_size, ...) plus eval_k, passed to the model."""

    AUTO_MODEL_CLASS = S2MoEForCausalLM

    def __init__(self, pretrained, trust_remote_code=False, backend="causal", **kwargs) -> None:
        if trust_remote_code:
            raise ConfigError(f"--model_args trust_remote_code=True: --model {MODEL_NAME} loads s2moe_ds's own "
                              "classes and never runs the export folder's Python; drop trust_remote_code")
        if backend not in ("default", "causal"):
            raise ConfigError(f"--model_args backend={backend}: our models are causal; drop backend")
        super().__init__(pretrained=pretrained, trust_remote_code=False, backend="causal", **kwargs)

    def _get_config(self, pretrained, **kwargs) -> None:
        hub = {k: kwargs[k] for k in ("revision", "subfolder") if kwargs.get(k)}
        config = S2MoEConfig.from_pretrained(pretrained, **hub)
        if getattr(config, "model_type", None) != MODEL_TYPE or not config.s2moe_model:
            raise ConfigError(f"--model_args pretrained={pretrained}: not an export of launch/consolidate.py "
                              f"--format hf (config.json has no s2moe_model); --model {MODEL_NAME} loads only those")
        self._config = config

    def _create_tokenizer(self, pretrained, tokenizer, **kwargs) -> None:
        if tokenizer is not None and not isinstance(tokenizer, str):
            self.tokenizer = tokenizer
            return
        hub = {k: kwargs[k] for k in ("revision", "subfolder") if kwargs.get(k)}
        source = tokenizer or (pretrained if isinstance(pretrained, str) else self.model.name_or_path)
        self.tokenizer = S2MoETokenizer.from_pretrained(source, **hub)
