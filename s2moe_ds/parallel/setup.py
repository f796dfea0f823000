"""Process-group start-up and `deepspeed.initialize`, with the checks DeepSpeed makes late or not at all."""

import json
import os
import socket
from typing import Any, Dict, Optional, Tuple, Union

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from ..config import ConfigError, is_finite_number
from . import deepspeed_internals as ds
from .grad_norm import clip_grad_norm, global_grad_norm


def free_port() -> int:
    """A TCP port free on loopback now, for a rendezvous (or any local server) started next."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_world_size() -> Optional[int]:
    """The process count the launcher was asked for, from its environment (None if it says none).

    Open MPI's and PMI's sizes come first: under `mpirun` inside a SLURM job every rank inherits
    the batch step's SLURM variables. SLURM's step task count counts only for tasks srun started
    (SLURM_STEP_ID set); torchrun and the deepspeed launcher set WORLD_SIZE.
    """
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    if os.environ.get("SLURM_STEP_ID") not in (None, "", "batch", "extern"):
        n = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS")
        if n and n.isdigit():
            return int(n)
    n = os.environ.get("WORLD_SIZE", "")
    return int(n) if n.isdigit() else None


def init_distributed(timeout_s: Optional[float] = None, expected_world_size: Optional[int] = None) -> None:
    """Start DeepSpeed's process group (gloo on CPU, NCCL on CUDA) once; a no-op afterwards.
    `timeout_s`: every collective's timeout, in this group and in every group created later.

    The world size is then checked against `expected_world_size` and against what the launcher
    asked for: a launcher that does not pass ranks on (srun without MPI, a mismatched MPI) starts
    independent singletons, which would each train alone and overwrite each other's checkpoints.
    """
    # Read before DeepSpeed starts: its MPI discovery (no MASTER_ADDR) rewrites WORLD_SIZE to the
    # size it found, which would then always agree.
    asked = launcher_world_size()
    if not deepspeed.comm.is_initialized():
        if get_accelerator().device_name() == "cpu":
            ds.skip_shm_comm_build()  # training never uses the extension it would build
        kwargs = {}
        if timeout_s is not None:
            from datetime import timedelta

            import torch.distributed.distributed_c10d as c10d
            kwargs["timeout"] = timedelta(seconds=timeout_s)
            # DeepSpeed creates its expert and data-parallel groups without a timeout, so they take
            # torch's default (30 minutes); torch reads these at each group's creation.
            c10d.default_pg_timeout = kwargs["timeout"]
            if hasattr(c10d, "default_pg_nccl_timeout"):
                c10d.default_pg_nccl_timeout = kwargs["timeout"]
        if os.environ.get("MASTER_PORT", "").isdigit():
            # DeepSpeed's MPI discovery (mpirun without RANK/WORLD_SIZE) overwrites MASTER_PORT with
            # this argument, 29500 by default; pass the launcher's port on so it is honoured.
            kwargs["distributed_port"] = int(os.environ["MASTER_PORT"])
        deepspeed.init_distributed(**kwargs)
        accel = get_accelerator()
        if accel.device_name() != "cpu" and os.environ.get("LOCAL_RANK", "").isdigit():
            # DeepSpeed picks the GPU only in deepspeed.initialize; our first collectives (the data
            # barrier) come before that, and NCCL would otherwise guess the device.
            accel.set_device(int(os.environ["LOCAL_RANK"]))
    world = deepspeed.comm.get_world_size()
    for source, wanted in (("--expect-world-size", expected_world_size), ("the launcher", asked)):
        if wanted is not None and wanted != world:
            raise ConfigError(
                f"world size: {source} asks for {wanted} processes but the process group has {world}. "
                "The launcher did not pass ranks on (e.g. srun without --mpi=pmix for an MPI program, or a "
                "wrapper that does not set RANK/WORLD_SIZE/MASTER_ADDR); stopping instead of training as "
                "independent singletons. See docs/cluster.md for launch commands that work.")


def load_ds_config(ds_config: Union[str, os.PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    """A DeepSpeed config as a dict, from a dict or a JSON file; errors name the file.

    `"bf16": {"enabled": "auto"}` (our extension; DeepSpeed itself wants a boolean) becomes true on
    an accelerator with native bf16 and false on the CPU accelerator, where bf16 runs but, without
    AMX, slower than fp32; set it to true explicitly to train in bf16 on a CPU.
    """
    if isinstance(ds_config, dict):
        cfg = json.loads(json.dumps(ds_config))
    else:
        path = os.fspath(ds_config)
        if not os.path.isfile(path):
            raise ConfigError(f"deepspeed_config: file not found: {path}")
        try:
            with open(path) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed_config: {path} is not valid JSON ({e})") from None
        _check_top_level(cfg, path)
    _check_top_level(cfg, "the DeepSpeed config")
    bf16 = cfg.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled") == "auto":
        accel = get_accelerator()
        bf16["enabled"] = accel.device_name() != "cpu" and accel.is_bf16_supported()
    return cfg


JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "true or false", int: "a number",
              float: "a number", type(None): "null"}


def _check_top_level(cfg, where: str) -> None:
    if not isinstance(cfg, dict):
        raise ConfigError(f"deepspeed_config: {where} holds {JSON_TYPES.get(type(cfg), type(cfg).__name__)} at its "
                          "top level; a DeepSpeed config is one JSON object of settings, e.g. "
                          "{\"train_micro_batch_size_per_gpu\": 16, \"optimizer\": {...}}")


def _json_paths(value, path: str = ""):
    """(path, value) of every leaf of a JSON value: `optimizer.params.betas[1]`."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _json_paths(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _json_paths(item, f"{path}[{i}]")
    else:
        yield path, value


def _check_finite(cfg: Dict[str, Any]) -> None:
    """No NaN or infinity anywhere (Python's JSON reader accepts NaN, Infinity and -Infinity): a
    learning rate or a clipping bound of that kind makes the weights non-finite."""
    for path, value in _json_paths(cfg):
        if isinstance(value, float) and not is_finite_number(value):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}; JSON's NaN and Infinity are no "
                              "setting, write the value itself (or remove the key for its default)")


def _check_field(params: Dict[str, Any], where: str, key: str, minimum: float, fix: str, strict: bool = False,
                 maximum: Optional[float] = None, nullable: bool = False) -> None:
    """params[key], if present, is a finite number >= minimum (> with strict, <= maximum)."""
    if key not in params or (nullable and params[key] is None):
        return
    value = params[key]
    ok = is_finite_number(value) and (value > minimum if strict else value >= minimum)
    ok = ok and (maximum is None or value <= maximum)
    if not ok:
        bounds = f"{'>' if strict else '>='} {minimum:g}" + ("" if maximum is None else f" and <= {maximum:g}")
        quoted = " (a JSON number has no quotes)" if isinstance(value, str) else ""
        raise ConfigError(f"{where}.{key}: must be a finite number {bounds}, got {value!r}{quoted}; {fix}")


def _section(cfg: Dict[str, Any], key: str, example: str, absent: str) -> Optional[Dict[str, Any]]:
    """cfg[key] as an object with an object of params (None when the key is absent)."""
    if key not in cfg:
        return None
    section = cfg[key]
    if not isinstance(section, dict):
        raise ConfigError(f"{key}: must be an object such as {example}, got {json.dumps(section)}; "
                          f"give one, or remove the key ({absent})")
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{key}.params: must be an object of the {key}'s settings, got "
                          f"{JSON_TYPES.get(type(params), type(params).__name__)}; e.g. {example}")
    return section


def _check_optimizer(cfg: Dict[str, Any]) -> None:
    opt = _section(cfg, "optimizer", '{"type": "AdamW", "params": {"lr": 0.001}}',
                   "AdamW is used, with the learning rate of --lr")
    if opt is None:
        return
    kind = opt.get("type")
    known = ds.optimizer_names()
    if not isinstance(kind, str) or (kind.lower() not in known and not hasattr(torch.optim, kind)):
        raise ConfigError(f"optimizer.type: {kind!r} is not an optimizer DeepSpeed knows; use one of "
                          f"{', '.join(known)} (or a torch.optim class name), e.g. \"AdamW\"")
    params, where = opt.get("params", {}), "optimizer.params"
    _check_field(params, where, "lr", 0.0, "e.g. 0.001, or remove it and pass --lr", strict=True)
    _check_field(params, where, "weight_decay", 0.0, "e.g. 0.01 (0 for none)")
    _check_field(params, where, "eps", 0.0, "e.g. 1e-8")
    _check_field(params, where, "momentum", 0.0, "e.g. 0.9 (0 for none)")
    betas = params.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(is_finite_number(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"{where}.betas: must be a list of two numbers in [0, 1), the decay rates of Adam's "
                          f"two moments, got {json.dumps(betas)}; e.g. [0.9, 0.999]")


SCHEDULE_FIELDS = {
    # name: (minimum, maximum, null allowed: DeepSpeed's default is None)
    **{name: (0.0, None, False) for name in ("warmup_min_lr", "cycle_min_lr", "cycle_max_lr", "decay_lr_rate",
                                             "cycle_min_mom", "cycle_max_mom", "decay_mom_rate", "lr_range_test_min_lr",
                                             "lr_range_test_step_rate", "warmup_num_steps", "cycle_first_step_size",
                                             "cycle_first_stair_count", "decay_step_size", "lr_range_test_step_size")},
    **{name: (0.0, None, True) for name in ("warmup_max_lr", "cycle_second_step_size", "cycle_second_stair_count")},
    "warmup_min_ratio": (0.0, 1.0, False), "cos_min_ratio": (0.0, 1.0, False), "total_num_steps": (1.0, None, False),
    "last_batch_iteration": (-1.0, None, False),
}
WARMUP_TYPES = ("linear", "log")


def _check_scheduler(cfg: Dict[str, Any]) -> None:
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES
    sched = _section(cfg, "scheduler", '{"type": "WarmupCosineLR", "params": {"warmup_num_steps": 100}}',
                     "our warmup and cosine decay over --max-steps is used")
    if sched is None:
        return
    kind = sched.get("type")
    if kind not in VALID_LR_SCHEDULES:
        raise ConfigError(f"scheduler.type: {kind!r} is not a DeepSpeed schedule; use one of "
                          f"{', '.join(VALID_LR_SCHEDULES)}, or remove \"scheduler\" for our warmup and cosine decay")
    params = sched.get("params", {})
    for key, (minimum, maximum, nullable) in SCHEDULE_FIELDS.items():
        _check_field(params, "scheduler.params", key, minimum, "give one, or remove it for DeepSpeed's default",
                     maximum=maximum, nullable=nullable)
    if "warmup_type" in params and params["warmup_type"] not in WARMUP_TYPES:
        raise ConfigError(f"scheduler.params.warmup_type: must be one of {', '.join(map(repr, WARMUP_TYPES))}, got "
                          f"{params['warmup_type']!r}")


def check_ds_config(cfg: Dict[str, Any]) -> None:
    """Refuse DeepSpeed settings that cannot work with native expert-parallel MoE, or that are not
    settings at all (a NaN, a negative learning rate, an optimizer of null), before any compute."""
    _check_top_level(cfg, "the DeepSpeed config")
    _check_finite(cfg)
    for key in ("zero_optimization", "fp16", "bf16"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise ConfigError(f"{key}: must be an object of settings, e.g. {{\"enabled\": true}} or "
                              f"{{\"stage\": 2}}, got {json.dumps(cfg[key])}; give one or remove the key")
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if stage == 3:
        raise ConfigError(
            "zero_optimization.stage: 3 is not supported. ZeRO-3 partitions every parameter across "
            "all ranks, while DeepSpeed's native MoE (which S2MoE builds on) shards experts by "
            "expert parallelism and keeps each expert whole on its rank; DeepSpeed refuses the "
            "combination. Use stage 2 or 1: experts are already sharded by ep_size, and ZeRO-1/2 "
            "shard the optimizer states of experts and the rest. For more memory, add "
            "zero_optimization.offload_optimizer {\"device\": \"cpu\"}.")
    if stage not in (0, 1, 2):
        raise ConfigError(f"zero_optimization.stage: must be 0, 1 or 2, got {stage!r}")
    _check_batch_fields(cfg)
    clip = cfg.get("gradient_clipping")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
        raise ConfigError(f"gradient_clipping: must be a number >= 0 (0 turns clipping off), got {clip!r}")
    _check_optimizer(cfg)
    _check_scheduler(cfg)
    if (cfg.get("fp16") or {}).get("enabled", False) and get_accelerator().device_name() == "cpu":
        raise ConfigError("fp16.enabled: fp16 is not supported on the CPU accelerator; "
                          "use \"bf16\": {\"enabled\": true} or fp32")
    if (cfg.get("bf16") or {}).get("enabled", False) and not get_accelerator().is_bf16_supported():
        raise ConfigError(f"bf16.enabled: this {get_accelerator().device_name()} device does not "
                          "support bf16; disable it or use fp16 on a GPU")


def keep_global_batch(cfg: Dict[str, Any], world_size: int, global_batch: int,
                      where: str) -> Tuple[Dict[str, Any], Optional[str]]:
    """(the DeepSpeed config with gradient_accumulation_steps set so that micro batch x steps x
    world_size is `global_batch`, a line saying what changed or None). A run resumed on fewer
    or more ranks keeps the optimization it had: the same samples per optimizer step. The micro
    batch (a memory choice) is the config's; ConfigError when no whole number of steps fits."""
    micro = cfg.get("train_micro_batch_size_per_gpu")
    if micro is None:
        total, steps = cfg.get("train_batch_size"), cfg.get("gradient_accumulation_steps", 1)
        micro = None if total is None else total // (steps * world_size)
    if not isinstance(micro, int) or micro < 1:
        raise ConfigError("train_micro_batch_size_per_gpu: a resume on another world size keeps the global batch "
                          "by changing gradient_accumulation_steps, so the DeepSpeed config must set the micro batch")
    if global_batch % (micro * world_size):
        fits = [m for m in range(1, global_batch // world_size + 1) if global_batch % (m * world_size) == 0]
        raise ConfigError(f"train_micro_batch_size_per_gpu: {where} trained with a global batch of {global_batch}, "
                          f"which {world_size} ranks with micro batch {micro} cannot make in whole accumulation "
                          f"steps; set train_micro_batch_size_per_gpu to one of {fits[-4:] or '(none)'} or resume on "
                          f"a world size that divides {global_batch // micro}")
    steps = global_batch // (micro * world_size)
    old = (cfg.get("train_micro_batch_size_per_gpu"), cfg.get("gradient_accumulation_steps", 1))
    new = {**cfg, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": steps,
           "train_batch_size": global_batch}
    if old == (micro, steps):
        return new, None
    return new, (f"global batch {global_batch} kept on {world_size} ranks: micro batch {micro} x "
                 f"gradient_accumulation_steps {steps} (the DeepSpeed config said {old[1]})")


BATCH_FIELDS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def _check_batch_fields(cfg: Dict[str, Any]) -> None:
    for key in BATCH_FIELDS:
        value = cfg.get(key)
        if key in cfg and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
    if "train_micro_batch_size_per_gpu" not in cfg and "train_batch_size" not in cfg:
        raise ConfigError("train_micro_batch_size_per_gpu: the DeepSpeed config sets neither it nor train_batch_size; "
                          "set the per-rank micro batch, e.g. \"train_micro_batch_size_per_gpu\": 16")


def check_ds_batch(cfg: Dict[str, Any], world_size: int) -> None:
    """The batch fields agree with each other on `world_size` ranks (DeepSpeed asserts this only
    inside initialize, after the data is prepared)."""
    micro, steps, total = (cfg.get(k) for k in BATCH_FIELDS)
    if total is None:
        return
    if micro is not None and steps is not None and total != micro * steps * world_size:
        raise ConfigError(f"train_batch_size: {total} is not train_micro_batch_size_per_gpu {micro} x "
                          f"gradient_accumulation_steps {steps} x {world_size} ranks = {micro * steps * world_size}; "
                          "set two of the three (or make the product agree)")
    per_rank = micro if micro is not None else steps
    if per_rank is not None and total % (per_rank * world_size):
        name = "train_micro_batch_size_per_gpu" if micro is not None else "gradient_accumulation_steps"
        raise ConfigError(f"train_batch_size: {total} is not a multiple of {name} {per_rank} x {world_size} ranks; "
                          "choose values whose product it is")
    if micro is None and steps is None and total % world_size:
        raise ConfigError(f"train_batch_size: {total} does not split over {world_size} ranks")


def initialize(model: torch.nn.Module,
               ds_config: Union[str, os.PathLike, Dict[str, Any]],
               **kwargs) -> Tuple[Any, Any, Any, Any]:
    """`deepspeed.initialize` after `check_ds_config` and a shm-free process-group start.

    Returns DeepSpeed's (engine, optimizer, dataloader, lr_scheduler). With an optimizer named in
    the config, the engine puts expert and non-expert parameters in separate groups itself. With
    ZeRO 0 the engine clips with (and reports) the global norm of grad_norm.py, each expert once.
    """
    cfg = load_ds_config(ds_config)
    check_ds_config(cfg)
    init_distributed()
    kwargs.setdefault("model_parameters", [p for p in model.parameters() if p.requires_grad])
    engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, config=cfg, **kwargs)
    max_norm = engine.gradient_clipping()
    ds.replace_zero0_clipping(engine, clip=lambda params: clip_grad_norm(params, max_norm), norm=global_grad_norm)
    return engine, optimizer, loader, scheduler
