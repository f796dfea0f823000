"""Process-group start-up and `deepspeed.initialize`, with the checks DeepSpeed makes late or not at all."""

import json
import os
import socket
from typing import Any, Dict, Optional, Tuple, Union

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from ..config import ConfigError
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
    bf16 = cfg.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled") == "auto":
        accel = get_accelerator()
        bf16["enabled"] = accel.device_name() != "cpu" and accel.is_bf16_supported()
    return cfg


def check_ds_config(cfg: Dict[str, Any]) -> None:
    """Refuse DeepSpeed settings that cannot work with native expert-parallel MoE, before any compute."""
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
    opt = cfg.get("optimizer")
    if opt is not None:
        kind = opt.get("type") if isinstance(opt, dict) else None
        known = ds.optimizer_names()
        if not isinstance(kind, str) or (kind.lower() not in known and not hasattr(torch.optim, kind)):
            raise ConfigError(f"optimizer.type: {kind!r} is not an optimizer DeepSpeed knows; use one of "
                              f"{', '.join(known)} (or a torch.optim class name), e.g. \"AdamW\"")
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
