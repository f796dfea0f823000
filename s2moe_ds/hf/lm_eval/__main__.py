"""`python -m s2moe_ds.hf.lm_eval ...`: lm_eval's command line (every flag of `lm_eval`) with our
model name `s2moe` registered (this package's __init__); errors of ours as `error: ...`, status 2."""

import sys

from lm_eval.__main__ import cli_evaluate

from ...config import ConfigError
from . import MODEL_NAME  # noqa: F401  (registers it)


def main() -> int:
    try:
        cli_evaluate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
