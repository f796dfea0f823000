"""The bottom of the house: ConfigError and the validators every config dataclass uses.

Each config lives beside the component it builds (models/config.py, moe/config.py, the blocks' and
routers' own files, parallel/config.py, data/config.py, train/config.py); they all validate in
``__post_init__`` with these helpers, so an error names its field and the fix before any compute.
"""

from .validate import (IMPLEMENTATION, ConfigError, check_bool, check_choice, check_int, check_known_fields,
                       check_number, check_optional_int, fail, is_finite_number, require, resolve_settings,
                       without_implementation_fields)

__all__ = ["IMPLEMENTATION", "ConfigError", "check_bool", "check_choice", "check_int", "check_known_fields",
           "check_number", "check_optional_int", "fail", "is_finite_number", "require", "resolve_settings",
           "without_implementation_fields"]
