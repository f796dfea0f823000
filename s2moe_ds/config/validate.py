"""Validators with named errors: every message starts with the field (``s2moe.noise_scale:``) and
says what would be accepted, so a bad flag or config file fails before any compute."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


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


def check_number(value, name: str, minimum: float, strict: bool) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number and (value > minimum if strict else value >= minimum) and value == value
    require(ok, name, f"must be a number {'>' if strict else '>='} {minimum}, got {value!r}")
