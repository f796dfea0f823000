"""`python -m s2moe_ds.hf.lm_eval ...`: lm_eval's command line (every flag of `lm_eval`) with our
model name `s2moe` registered (this package's __init__); errors of ours as `error: ...`, status 2.
Before lm_eval reads a task, the task folders and files it is given (--include_path, --tasks paths,
and those of a --config file) are refused if they hold Python or YAML that runs it (task_sources)."""

import sys

import yaml
from lm_eval._cli import HarnessCLI
from lm_eval.utils import setup_logging

from ...config import ConfigError
from . import MODEL_NAME  # noqa: F401  (registers it)
from .task_sources import check_task_folder, check_task_sources


def _check_args(args) -> None:
    check_task_sources(getattr(args, "include_path", None), getattr(args, "tasks", None) or ())
    config = getattr(args, "config", None)
    if config:
        # lm_eval reads include_path and tasks from it too; it is plain YAML data or refused.
        check_task_folder(config, "--config")
        with open(config) as f:
            cfg = yaml.safe_load(f) or {}
        if isinstance(cfg, dict):
            tasks = cfg.get("tasks") or ()
            check_task_sources(cfg.get("include_path"), [tasks] if isinstance(tasks, str) else tasks)


def main() -> int:
    setup_logging()
    parser = HarnessCLI()
    try:
        args = parser.parse_args()
        _check_args(args)
        parser.execute(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
