"""The routing settings every router shares, checked in one place: MoEConfig's fields, and the same
arguments of the S2MoE drop-in layer."""

from ..config import check_bool, check_int, check_number, require

BALANCE_COEF = 0.01
"""The default weight of the router's load-balancing loss (MoEConfig.balance_coef, S2MoE's balance_coef)."""


def check_top_k(k, num_experts: int, name: str) -> None:
    """k experts per token: an integer in [1, num_experts]."""
    check_int(k, name, 1)
    require(k <= num_experts, name, f"must be <= num_experts ({num_experts}), got {k}")


def check_routing(prefix: str, num_experts, k, eval_k, capacity_factor, eval_capacity_factor, min_capacity,
                  drop_tokens, eval_drop_tokens, balance_coef) -> None:
    """Each shared routing setting, its error named `prefix` + the field."""
    p = prefix
    check_int(num_experts, p + "num_experts", 1)
    check_top_k(k, num_experts, p + "k")
    if eval_k is not None:
        check_top_k(eval_k, num_experts, p + "eval_k")
    check_number(capacity_factor, p + "capacity_factor", 0.0, strict=True)
    check_number(eval_capacity_factor, p + "eval_capacity_factor", 0.0, strict=True)
    check_int(min_capacity, p + "min_capacity", 0)
    check_bool(drop_tokens, p + "drop_tokens")
    check_bool(eval_drop_tokens, p + "eval_drop_tokens")
    check_number(balance_coef, p + "balance_coef", 0.0, strict=False)
