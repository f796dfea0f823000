"""Our language models behind Transformers' model interface: `S2MoEForCausalLM.from_pretrained`
on an export of launch/consolidate.py (export.py) gives the logits of s2moe_ds's own model.

The module inside is the backbone s2moe_ds builds (models/registry.py), on one process with every
expert (ep_size 1): nothing of the model is written twice. `eval_k` (the export's, or
`from_pretrained(path, eval_k=2)`) is the experts per token; the model is in eval mode as
Transformers returns it, so the blocks route without noise. A backbone with memory (Transformer-XL)
reads a long input in segments of max_seq_len, each attending over the memory of the ones before,
as our evaluation reads a stream.

Shapes: B sequences, T tokens, V vocabulary.
"""

import json
import os
from dataclasses import replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from ..checkpoint.consolidate import check_config_fits
from ..config import ConfigError
from ..models import ModelConfig, build_model, model_config_from_dict

MODEL_TYPE = "s2moe"


class S2MoEConfig(PretrainedConfig):
    """Transformers' config around our ModelConfig (`s2moe_model`, its to_dict()), with the names
    other tools read (vocab_size, hidden_size, max_position_embeddings, ...) derived from it."""

    model_type = MODEL_TYPE

    def __init__(self, s2moe_model: Optional[dict] = None, eval_k: Optional[int] = None, **kwargs) -> None:
        self.s2moe_model = dict(s2moe_model or {})
        self.eval_k = eval_k
        if self.s2moe_model:
            m = self.model_config()
            derived = {"vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layer,
                       "num_attention_heads": m.n_head, "intermediate_size": m.d_inner,
                       "max_position_embeddings": m.max_seq_len}
            kwargs.update(derived)
        # The output layer reuses the input embedding inside the backbone; there is no separate
        # output-embedding module for Transformers to tie, and no key-value cache.
        kwargs["tie_word_embeddings"] = False
        kwargs["use_cache"] = False
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """Our ModelConfig, evaluating with `eval_k` experts per token when set."""
        cfg = model_config_from_dict(self.s2moe_model)
        if self.eval_k is not None:
            cfg = replace(cfg, moe=replace(cfg.moe, eval_k=self.eval_k))
        return cfg


class S2MoEForCausalLM(PreTrainedModel, GenerationMixin):

    config_class = S2MoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: S2MoEConfig) -> None:
        super().__init__(config)
        self.model = build_model(config.model_config())
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Transformers' from_pretrained (the Auto classes and lm_eval's model `s2moe` call it),
        after checking config.json against model.safetensors' shapes (its header only): the model
        is built from config.json, and its buffers are allocated even when its weights are not,
        so an altered config.json could otherwise ask for any size."""
        path = pretrained_model_name_or_path
        if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
            folder = os.path.join(path, kwargs.get("subfolder") or "")
            config = kwargs.get("config")
            if not isinstance(config, S2MoEConfig):
                config = S2MoEConfig.from_pretrained(folder)
            check_export_fits(config, folder)
        return super().from_pretrained(path, *args, **kwargs)

    def _init_weights(self, module) -> None:
        """The backbone initialises itself (models/base.py); an export then overwrites every weight."""

    def get_input_embeddings(self):
        return self.model.tok_emb

    def set_input_embeddings(self, value) -> None:
        self.model.tok_emb = value

    def logits(self, input_ids_BT: torch.Tensor, mask_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, T, V]: one forward, or for a backbone with memory one per segment of max_seq_len."""
        cfg = self.model.cfg
        if not cfg.has_memory:
            return self.model(input_ids_BT, mask_BT=mask_BT).logits
        state, parts = None, []
        for start in range(0, input_ids_BT.shape[1], cfg.max_seq_len):
            seg = slice(start, start + cfg.max_seq_len)
            out = self.model(input_ids_BT[:, seg], mask_BT=None if mask_BT is None else mask_BT[:, seg], state=state)
            state = out.state
            parts.append(out.logits)
        return torch.cat(parts, dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **kwargs) -> CausalLMOutput:
        """input_ids: [B, T]; attention_mask: [B, T], 1 on tokens, 0 on right padding (causal
        attention never lets a token see the padding after it; left padding would be seen, so it
        is refused); labels: [B, T], Transformers' convention (the model shifts them; -100 ignored)."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("S2MoEForCausalLM takes input_ids, not inputs_embeds")
        mask_BT = None
        if attention_mask is not None:
            mask_BT = attention_mask.to(input_ids.device)
            if bool((mask_BT[:, 1:] > mask_BT[:, :-1]).any()):
                raise ValueError("attention_mask: padding before a token (left padding); these models have "
                                 "learned or relative positions and no padding mask in attention: pad on the "
                                 "right (tokenizer.padding_side = 'right')")
        logits_BTV = self.logits(input_ids, mask_BT)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits_BTV[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits_BTV.device),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits_BTV)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask=None, **kwargs):
        """No key-value cache: every step reads the whole sequence so far."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}


WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def stored_shapes(folder: str) -> Dict[str, Tuple[int, ...]]:
    """{key: shape} of an export's weights, read from the safetensors headers (no tensor data),
    keys without the `model.` prefix, as the backbone names them. ConfigError if there are none."""
    from safetensors import safe_open
    files = [WEIGHTS]
    if not os.path.isfile(os.path.join(folder, WEIGHTS)) and os.path.isfile(os.path.join(folder, WEIGHTS_INDEX)):
        with open(os.path.join(folder, WEIGHTS_INDEX)) as f:
            files = sorted(set(json.load(f).get("weight_map", {}).values()))
        if any(os.path.basename(n) != n for n in files):
            raise ConfigError(f"{os.path.join(folder, WEIGHTS_INDEX)}: names files outside its folder; not an export "
                              "of ours")
    shapes = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ConfigError(f"{folder}: no {name}; an export of launch/consolidate.py --format hf holds its weights "
                              f"in {WEIGHTS}: export again")
        try:
            with safe_open(path, framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise ConfigError(f"{path}: not a readable safetensors file ({e}); export again") from None
    prefix = S2MoEForCausalLM.base_model_prefix + "."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in shapes.items()}


def check_export_fits(config: S2MoEConfig, folder: str) -> None:
    """Refuse an export whose config.json does not fit its weights' shapes, before anything is built."""
    where = os.path.join(folder, "config.json")
    if not config.s2moe_model:
        raise ConfigError(f"{where}: no s2moe_model; not an export of launch/consolidate.py --format hf")
    try:
        cfg = config.model_config()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: its model config is not one of ours ({e})") from None
    check_config_fits(cfg, stored_shapes(folder), where)


def register() -> None:
    """Make AutoConfig, AutoModelForCausalLM and AutoTokenizer know model_type 's2moe' in this
    process (`import s2moe_ds.hf` calls it), so that an export loads with no trust_remote_code.
    Without trust_remote_code, a registered model_type wins over a folder's auto_map and its .py
    files are never run; with trust_remote_code=True Transformers prefers the folder's code."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .tokenizer import S2MoETokenizer
    AutoConfig.register(MODEL_TYPE, S2MoEConfig, exist_ok=True)
    AutoModelForCausalLM.register(S2MoEConfig, S2MoEForCausalLM, exist_ok=True)
    AutoTokenizer.register(S2MoEConfig, slow_tokenizer_class=S2MoETokenizer, exist_ok=True)
