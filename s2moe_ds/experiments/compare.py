"""The comparison harness's plan and its report: which runs, with which flags, and the table.

A variant is a name and the pretraining flags that make it (fields of MoEConfig, of its block
kind's settings and of its router's); every variant runs with the same preset, steps, batch, data
and seeds, so the only difference between two rows is the variant's own fields. The report keeps
to numbers that are deterministic (BPC or perplexity of full passes), so the same command with the
same seeds gives the same table.
"""

import json
import re
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import ConfigError
from ..moe import BLOCKS, MoEConfig
from ..moe.config import nest_settings, setting_owners
from ..tables import markdown_table
from ..train.presets import model_preset

BASELINE_ROUTERS = {"smoe": "topk", "xmoe": "xmoe", "stablemoe": "stablemoe", "smoe-dropout": "smoe_dropout"}
"""The paper's baselines by their name in its tables, and the router each one is."""


def _routed(block: str, router: str, k: int) -> Dict[str, object]:
    # The default router stays implicit, so the commands (and the runs they name) of before the
    # other routers existed are unchanged.
    return {"block": block, "k": k, **({} if router == MoEConfig.router else {"router": router})}


BUILTIN_VARIANTS: Dict[str, Dict[str, object]] = {
    # The paper's baselines, top-2 on DeepSpeed's own MoE (SMoE is DeepSpeed's top-k gate) ...
    **{name: _routed("moe", router, 2) for name, router in BASELINE_ROUTERS.items()},
    # ... and S2MoE over each of their routers, top-2 on each path (the paper's setting).
    "s2moe": _routed("s2moe", "topk", 2),
    **{f"s2moe-{name}": _routed("s2moe", router, 2) for name, router in BASELINE_ROUTERS.items() if router != MoEConfig.router},
    # Loss-free balancing (DeepSeek-V3's router, no balance loss), plain and under S2MoE.
    "lossfree": _routed("moe", "lossfree", 2),
    "s2moe-lossfree": _routed("s2moe", "lossfree", 2),
    # The top-k router with ST-MoE's router z-loss at ST-MoE's weight, plain and under S2MoE.
    "smoe-zloss": {**_routed("moe", "topk", 2), "z_loss_coef": 0.001},
    "s2moe-zloss": {**_routed("s2moe", "topk", 2), "z_loss_coef": 0.001},
    # S2MoE with top-1 per path: 2 paths x 1 expert, the expert compute per token of SMoE top-2.
    "s2moe-top1": _routed("s2moe", "topk", 1),
    # Where S2MoE's gain comes from (issue 28's attribution study, docs/results.md): the noisy
    # copies dispatched but not mixed in, mixed half and half, drawn without the batch-mean shift,
    # and the lite form (no noisy dispatch: the copy exists only for the InfoNCE loss).
    "s2moe-gate1": {**_routed("s2moe", "topk", 2), "mix_gate_fixed": 1.0},
    "s2moe-gate0.5": {**_routed("s2moe", "topk", 2), "mix_gate_fixed": 0.5},
    "s2moe-noshift": {**_routed("s2moe", "topk", 2), "noise_shift": False},
    "s2moe-lite": {**_routed("s2moe", "topk", 2), "noisy_dispatch": False},
    "smoe-top1": _routed("moe", "topk", 1),
    "dense": {"block": "dense"},
}


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: Tuple[Tuple[str, object], ...]
    """(field, value) pairs of MoEConfig and of its block's and router's settings, in a fixed order."""

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.name)

    def _get(self, key: str) -> str:
        return str(dict(self.overrides).get(key, getattr(MoEConfig, key)))

    @property
    def block(self) -> str:
        return self._get("block")

    @property
    def routed(self) -> bool:
        return BLOCKS[self.block].routed

    def accepts(self, key: str) -> bool:
        """Whether `key` is a field of this variant's MoEConfig, block kind or router."""
        chosen = {"moe": "", "block": self.block, "router": self._get("router")}
        return any(chosen[what] == name for what, name in setting_owners(key))

    def moe_dict(self) -> Dict[str, object]:
        return nest_settings(dict(self.overrides), self.block, self._get("router"))

    def flags(self) -> List[str]:
        out = []
        for key, value in self.overrides:
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                out.append(flag if value else "--no-" + key.replace("_", "-"))
            else:
                out += [flag, str(value)]
        return out


def parse_value(text: str):
    """'0.5' -> 0.5, '2' -> 2, 'true' -> True, 'global' -> 'global'."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignment(spec: str, what: str) -> Tuple[str, List[object]]:
    """'field=v1,v2' -> (field, [v1, v2]), the field checked against MoEConfig and the settings of
    every registered block kind and router."""
    if "=" not in spec:
        raise ConfigError(f"{what}: {spec!r} is not FIELD=VALUE[,VALUE...], e.g. uncertainty_coef=0,0.5")
    key, values = spec.split("=", 1)
    key = key.strip().replace("-", "_")
    if not setting_owners(key):
        raise ConfigError(f"{what}: unknown field {key!r}; use a field of MoEConfig or of a block kind's or "
                          "router's settings (launch/pretrain.py --help lists them)")
    parsed = [parse_value(v.strip()) for v in values.split(",") if v.strip() != ""]
    if not parsed:
        raise ConfigError(f"{what}: {spec!r} gives no value")
    return key, parsed


def plan_variants(names: Sequence[str], ablations: Sequence[str] = (), ablate_base: str = "s2moe",
                  sets: Sequence[str] = (), preset: str = "tiny") -> List[Variant]:
    """The variants to run: each built-in name, then one variant per ablation value (on top of
    ablate_base); `sets` (FIELD=VALUE) apply to every variant whose block kind or router has the
    field. Each is validated by building its model config, so a bad field or value stops here,
    before any training."""
    common: List[Tuple[str, object]] = []
    for spec in sets:
        key, values = parse_assignment(spec, "--set")
        if len(values) != 1:
            raise ConfigError(f"--set: {spec!r} must give exactly one value")
        common.append((key, values[0]))

    def make(name: str, extra: Sequence[Tuple[str, object]] = ()) -> Variant:
        if name not in BUILTIN_VARIANTS:
            raise ConfigError(f"--variants: unknown variant {name!r}; choose from {', '.join(BUILTIN_VARIANTS)}")
        own = Variant(name, tuple(sorted({**BUILTIN_VARIANTS[name], **dict(extra)}.items())))
        merged = {k: v for k, v in common if own.accepts(k)}
        merged.update(BUILTIN_VARIANTS[name])
        merged.update(extra)
        label = name + "".join(f" {k}={v}" for k, v in extra)
        variant = Variant(label, tuple(sorted(merged.items())))
        for key, _ in extra:
            if not variant.accepts(key):
                raise ConfigError(f"--ablate: {key!r} is not a setting of variant {name!r} (block {variant.block!r})")
        model_preset(preset, moe=variant.moe_dict())  # raises ConfigError naming the field
        return variant

    variants = [make(n) for n in names]
    for spec in ablations:
        key, values = parse_assignment(spec, "--ablate")
        variants += [make(ablate_base, [(key, v)]) for v in values]
    for key, _ in common:
        if variants and not any(v.accepts(key) for v in variants):
            raise ConfigError(f"--set: {key!r} is a setting of none of the variants")
    seen = set()
    for v in variants:
        if v.name in seen:
            raise ConfigError(f"--variants/--ablate: variant {v.name!r} is listed twice")
        seen.add(v.name)
    return variants


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{mean:.4f} ± {std:.4f}" if len(values) > 1 else f"{mean:.4f}"


def eval_value(result: Dict, split: str, eval_k: Optional[int], metric: str) -> Optional[float]:
    for row in result["eval"]["results"]:
        if row["split"] == split and row["eval_k"] in (eval_k, None):
            return row[metric]
    return None


def _means(runs: Sequence[Dict], key: str, digits: int) -> str:
    values = [r[key] for r in runs if r.get(key) is not None]
    return f"{statistics.fmean(values):.{digits}f}" if values else "-"


def summary_table(variants: Sequence[Variant], results: Dict[str, List[Dict]], metric: str,
                  reference: Optional[str] = "smoe", splits: Sequence[str] = ("valid", "test"),
                  expected: Optional[int] = None) -> str:
    """Markdown: per variant and split, mean ± sample std over seeds of the metric with 1 and with
    2 experts per token, how the one-expert mean compares with the reference's two-expert mean,
    and S2MoE's mixing gate at the end of training (mean over layers and seeds). Deterministic:
    the same command and seeds give the same table. With `expected` seeds per variant, a variant
    with fewer finished runs shows 'n of expected' (a study read while some runs still train)."""
    ref = results.get(reference) if reference else None
    head = ["variant", "seeds"]
    for split in splits:
        head += [f"{split} {metric} (1 expert)", f"{split} {metric} (2 experts)"]
    if ref:
        head.append(f"valid: 1 expert - {reference} with 2")
    head.append("mix gate (end)")
    rows = []
    for v in variants:
        runs = results.get(v.name, [])
        row = [v.name, str(len(runs)) if expected is None or len(runs) >= expected else f"{len(runs)} of {expected}"]
        for split in splits:
            for k in (1, 2):
                row.append(_cell([x for x in (eval_value(r, split, k, metric) for r in runs) if x is not None]))
        if ref:
            ones = [x for x in (eval_value(r, "valid", 1, metric) for r in runs) if x is not None]
            twos = [x for x in (eval_value(r, "valid", 2, metric) for r in ref) if x is not None]
            row.append(f"{statistics.fmean(ones) - statistics.fmean(twos):+.4f}" if ones and twos else "-")
        row.append(_means(runs, "final_mix_gate_mean", 3))
        rows.append(row)
    return markdown_table(head, rows)


def cost_table(variants: Sequence[Variant], results: Dict[str, List[Dict]]) -> str:
    """Markdown: the measured training cost per variant (mean over seeds of each run's median
    step time and throughput). Timings, so not reproducible to the digit like the summary."""
    rows = [[v.name, _means(results.get(v.name, []), "train_step_ms_median", 1),
             _means(results.get(v.name, []), "train_tokens_per_s_median", 0),
             _means(results.get(v.name, []), "train_wall_s", 0)] for v in variants]
    return markdown_table(["variant", "train ms/step (median)", "train tokens/s (median)", "train wall s"], rows)


def per_seed_table(variants: Sequence[Variant], results: Dict[str, List[Dict]], metric: str) -> str:
    rows = []
    for v in variants:
        for r in results.get(v.name, []):
            one, two = eval_value(r, "valid", 1, metric), eval_value(r, "valid", 2, metric)
            rows.append([v.name, r["seed"], f"{one:.4f}", f"{two:.4f}"])
    return markdown_table(["variant", "seed", f"valid {metric} (1 expert)", f"valid {metric} (2 experts)"], rows)
