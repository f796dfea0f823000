"""Validators with named errors: every message starts with the field (``s2moe.noise_scale:``) and
says what would be accepted, so a bad flag or config file fails before any compute."""


import math
from dataclasses import fields, is_dataclass

IMPLEMENTATION = {"implementation": True}
"""Field metadata of a setting that changes how a result is computed, not the result (a run may
resume with another value)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def without_implementation_fields(obj):
    """A config dataclass as a dict, nested ones included, less the fields marked IMPLEMENTATION."""
    if not is_dataclass(obj):
        return obj
    return {f.name: without_implementation_fields(getattr(obj, f.name)) for f in fields(obj)
            if not f.metadata.get("implementation")}


def fail(name: str, message: str) -> None:
    raise ConfigError(f"{name}: {message}")


def require(ok: bool, name: str, message: str) -> None:
    if not ok:
        fail(name, message)


def check_choice(value, name: str, choices) -> None:
    require(value in choices, name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_bool(value, name: str) -> None:
    require(isinstance(value, bool), name, f"must be true or false, got {value!r}")


def check_int(value, name: str, minimum: int) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, name,
            f"must be an integer >= {minimum}, got {value!r}")


def check_optional_int(value, name: str, minimum: int) -> None:
    if value is not None:
        check_int(value, name, minimum)


def check_known_fields(values, cls, name: str, owner: str) -> None:
    """Every key of `values` is a field of the dataclass `cls` (the settings of `owner`)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    require(not unknown, name, f"unknown field(s) {', '.join(map(repr, unknown))} for {owner}; "
            f"its fields: {', '.join(sorted(known))}")


def is_finite_number(value) -> bool:
    """An int or a float that is neither NaN nor infinite (a bool is no number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    # An int is finite however large; math.isfinite would overflow converting a huge one.
    return isinstance(value, int) or math.isfinite(value)


def check_number(value, name: str, minimum: float, strict: bool) -> None:
    """A finite number above (strict) or at least `minimum`: NaN or infinity in a setting would
    reach the weights, and a run trained with it would save them as if healthy."""
    ok = is_finite_number(value) and (value > minimum if strict else value >= minimum)
    bound = "" if minimum == -math.inf else f" {'>' if strict else '>='} {minimum}"
    require(ok, name, f"must be a finite number{bound}, got {value!r}")


def resolve_settings(value, cls, name: str, owner: str):
    """A component's own settings (a backbone's, a block kind's or a router's): None (its defaults),
    a dict of its fields, or `cls`."""
    if cls is None:
        require(value in (None, {}), name, f"{owner} has no settings of its own, got {value!r}")
        return None
    if value is None:
        return cls()
    if isinstance(value, dict):
        check_known_fields(value, cls, name, owner)
        return cls(**value)
    require(isinstance(value, cls), name, f"must be a {cls.__name__} or a dict of its fields, "
            f"got {type(value).__name__}")
    return value
