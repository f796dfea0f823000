"""Turn a checkpoint into one fp32 model that loads without DeepSpeed's engine: our file or a
Hugging Face export (flags: --help, or docs/cli.md)."""

import os
import sys

from s2moe_ds.checkpoint import consolidate, model_config_for_inference, resolve_checkpoint
from s2moe_ds.checkpoint.output import check_output, write_consolidated
from s2moe_ds.cli import consolidate_parser
from s2moe_ds.config import ConfigError


def _export_hf(args, state, client, config) -> None:
    try:
        from s2moe_ds.hf import LM_EVAL_TASK, export_hf, write_lm_eval_task
    except ImportError as e:
        raise ConfigError(f"--format hf: {e}; install the optional extra: pip install -e '.[hf]'") from e
    export_hf(state, config, os.path.join(resolve_checkpoint(args.checkpoint, args.tag), "tokenizer.json"), args.out,
              meta={"step": client.get("step")}, remote_code_shims=args.remote_code_shims)
    print(f"wrote {args.out}: model.safetensors ({sum(t.numel() for t in state.values()):,} parameters, fp32), "
          f"config.json, tokenizer{', trust_remote_code shims' if args.remote_code_shims else ''}; load with\n"
          "  import s2moe_ds.hf  # registers our classes with Transformers' Auto classes\n"
          f"  AutoModelForCausalLM.from_pretrained({args.out!r})  # no trust_remote_code\n"
          "Never pass trust_remote_code=True for an export you did not write: it runs the Python files "
          "in the folder, whoever put them there.")
    if args.lm_eval_text is not None:
        tasks = write_lm_eval_task(args.lm_eval_text, args.out)
        print(f"lm-evaluation-harness task {LM_EVAL_TASK} in {tasks} (beside the export, never inside it: "
              f"never --include_path a task folder you did not write); run:\n"
              f"  python -m s2moe_ds.hf.lm_eval --model s2moe --model_args pretrained={args.out},dtype=float32 "
              f"--include_path {tasks} --tasks {LM_EVAL_TASK} --device cpu --batch_size 8")


def main(argv=None) -> int:
    args = consolidate_parser().parse_args(argv)
    try:
        for flag, value in (("--lm-eval-text", args.lm_eval_text), ("--remote-code-shims", args.remote_code_shims)):
            if value not in (None, False) and args.format != "hf":
                raise ConfigError(f"{flag}: needs --format hf (it concerns the Hugging Face export)")
        check_output(args.out, args.checkpoint, args.format, args.force, args.lm_eval_text)
        state, client = consolidate(args.checkpoint, args.tag)
        # Checked against the weights' shapes before anything is built from it (a crafted size).
        config = model_config_for_inference(client, state=state, where=f"--checkpoint: {args.checkpoint}").to_dict()
        if args.format == "hf":
            _export_hf(args, state, client, config)
            return 0
        write_consolidated(args.out, args.checkpoint, args.force, state, config, client.get("tokenizer"))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(state)} tensors, {sum(t.numel() for t in state.values()):,} parameters (fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
