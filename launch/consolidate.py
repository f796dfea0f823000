"""Turn a checkpoint into one fp32 model that loads without DeepSpeed's engine: our file or a
Hugging Face export (flags: --help, or docs/cli.md)."""

import os
import sys

from s2moe_ds.checkpoint import consolidate, model_config_for_inference, resolve_checkpoint
from s2moe_ds.checkpoint.output import check_output, write_consolidated
from s2moe_ds.cli import consolidate_parser
from s2moe_ds.config import ConfigError


def _export_hf(args, state, client) -> None:
    try:
        from s2moe_ds.hf import LM_EVAL_TASK, export_hf, write_lm_eval_task
    except ImportError as e:
        raise ConfigError(f"--format hf: {e}; install the optional extra: pip install -e '.[hf]'") from e
    if args.lm_eval_text is not None and not os.path.isfile(args.lm_eval_text):
        raise ConfigError(f"--lm-eval-text: file not found: {args.lm_eval_text}")
    config = model_config_for_inference(client).to_dict()
    tokenizer = os.path.join(resolve_checkpoint(args.checkpoint, args.tag), "tokenizer.json")
    export_hf(state, config, tokenizer, args.out, meta={"step": client.get("step")},
              remote_code_shims=args.remote_code_shims)
    print(f"wrote {args.out}: model.safetensors ({sum(t.numel() for t in state.values()):,} parameters, fp32), "
          f"config.json, tokenizer{', trust_remote_code shims' if args.remote_code_shims else ''}; load with\n"
          "  import s2moe_ds.hf  # registers our classes with Transformers' Auto classes\n"
          f"  AutoModelForCausalLM.from_pretrained({args.out!r})  # no trust_remote_code\n"
          "Never pass trust_remote_code=True for an export you did not write: it runs the Python files "
          "in the folder, whoever put them there.")
    if args.lm_eval_text is not None:
        tasks = write_lm_eval_task(args.lm_eval_text, args.out)
        print(f"lm-evaluation-harness task {LM_EVAL_TASK} in {tasks}; run:\n"
              f"  python -m s2moe_ds.hf.lm_eval --model s2moe --model_args pretrained={args.out},dtype=float32 "
              f"--include_path {tasks} --tasks {LM_EVAL_TASK} --device cpu --batch_size 8")


def main(argv=None) -> int:
    args = consolidate_parser().parse_args(argv)
    try:
        if args.lm_eval_text is not None and args.format != "hf":
            raise ConfigError("--lm-eval-text: needs --format hf (lm-evaluation-harness loads the Hugging Face export)")
        if args.remote_code_shims and args.format != "hf":
            raise ConfigError("--remote-code-shims: needs --format hf (the shims are files of the Hugging Face export)")
        check_output(args.out, args.checkpoint, args.format, args.force)
        state, client = consolidate(args.checkpoint, args.tag)
        if args.format == "hf":
            _export_hf(args, state, client)
            return 0
        config = model_config_for_inference(client).to_dict()
        write_consolidated(args.out, args.checkpoint, args.force, state, config, client.get("tokenizer"))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(state)} tensors, {sum(t.numel() for t in state.values()):,} parameters (fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
