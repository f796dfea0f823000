"""Shared machinery of the bench_* scripts: device and process-group set-up, interleaved timing,
peak memory, machine description, markdown tables, targets and the JSON record.

Every script measures all its variants in ONE process and interleaves them (rep 1 of every
variant, then rep 2 of every variant, ...) with the order rotated each rep, so a change of machine
load (this machine is shared with training jobs) hits every variant alike. Ratios between two
variants are taken per rep (paired) and summarised by their median, which a load spike in one rep
cannot move much.
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from s2moe_ds.tables import markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- command line


def add_common_args(parser: argparse.ArgumentParser, default_json: str, warmup: int = 2, reps: int = 7) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run; auto picks cuda when torch sees a GPU, else cpu")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                        help="parameter and activation dtype (router, mixing gate and noise stay fp32 inside)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls per variant before timing")
    parser.add_argument("--reps", type=int, default=reps, help="timed calls per variant (interleaved)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads on CPU (0: torch's choice, the core count). Default 1: "
                             "on a machine shared with other jobs, an OpenMP team as large as the core count "
                             "stalls at every barrier (measured here: paper-small inference 8x slower)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="on CPU, leave glibc's allocator as it is: blocks of 128 KiB and more then go back "
                             "to the OS when freed, and every call pays page faults to get them again (see "
                             "keep_freed_memory)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory pass (on CPU it runs each variant once under the profiler)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument("--json", default=os.path.join(ROOT, "runs", "bench", default_json),
                        help="where to write the JSON record")


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str]) -> None:
    """Reject non-positive integer flags up front, naming the flag."""
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v < 1 for v in values):
            parser.error(f"--{name}: must be >= 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup: must be >= 0, got {args.warmup}")


def resolve_device(args: argparse.Namespace) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: torch sees no CUDA GPU")
    name = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if args.threads < 0:
        raise SystemExit(f"error: --threads: must be >= 0, got {args.threads}")
    if name == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    if name == "cpu" and not args.system_malloc:
        args.malloc = "kept" if keep_freed_memory() else "system (mallopt unavailable)"
    else:
        args.malloc = "system" if name == "cpu" else "cuda caching allocator"
    return torch.device(name)


_KEEP_FREED = ((-3, 32 << 20), (-1, (1 << 31) - 1), (-2, 64 << 20))
"""glibc's mallopt (parameter, value): M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 2 GiB - 1, M_TOP_PAD 64 MiB."""


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process, as a GPU's caching allocator does.

    By default glibc serves blocks above a moving threshold (128 KiB at first) with their own
    mmap and trims the heap when its top is free, so the [T, D] activations of a call can be new
    pages, faulted in again on first touch. Measured here while the host reclaimed memory:
    10,000-14,000 minor faults per S2MoE layer call and calls of 214-250 ms, against none and
    181-189 ms with these settings; in runs without the faults the two gave the same ratios. The
    cost weighs on a variant in proportion to the bytes it allocates, where a CUDA run (and torch's
    CPU tuning guide, with jemalloc or tcmalloc) has none. Blocks up to 32 MiB (glibc's largest
    threshold) then come from a heap that is never trimmed. True when mallopt took every setting."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    return all(mallopt(param, value) == 1 for param, value in _KEEP_FREED)


def setup_single_process() -> None:
    """A world-size-1 DeepSpeed process group (gloo on CPU, NCCL on CUDA), as tests/harness.py
    starts each rank: MoE layers then get real expert-parallel groups, as under an engine."""
    from s2moe_ds.parallel import free_port, init_distributed
    if not os.environ.get("MASTER_PORT"):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    init_distributed()


def wire_moe_groups(module: torch.nn.Module) -> None:
    """What deepspeed.initialize does for MoE layers: create and attach their process groups."""
    for m in module.modules():
        if hasattr(m, "set_deepspeed_parallelism"):
            m.set_deepspeed_parallelism()


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    seconds: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def quantiles(self):
        s = sorted(self.seconds)
        if len(s) < 2:
            return s[0], s[0]
        q = statistics.quantiles(s, n=4, method="inclusive")
        return q[0], q[2]


def time_interleaved(variants: Dict[str, Callable[[], None]], device: torch.device, warmup: int,
                     reps: int) -> Dict[str, Timing]:
    """Seconds per call of each variant, interleaved rep by rep with a rotating order."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    synchronize(device)
    out = {name: Timing() for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            variants[name]()
            synchronize(device)
            out[name].seconds.append(time.perf_counter() - start)
    return out


def paired_ratio(timings: Dict[str, Timing], num: str, den: str) -> Dict[str, float]:
    """Time of `num` over time of `den`, per rep (both ran back to back), then median and IQR."""
    ratios = [a / b for a, b in zip(timings[num].seconds, timings[den].seconds)]
    t = Timing(ratios)
    q1, q3 = t.quantiles()
    return {"median": t.median, "q1": q1, "q3": q3}


# ----------------------------------------------------------------------------- memory


def _cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of bytes allocated by torch during fn above what was live at its start.

    torch has no CPU counterpart of cuda.max_memory_allocated; its profiler, with
    profile_memory, records every CPU allocation and free, so the running sum of those gives the
    same quantity (tracemalloc cannot: torch's CPU allocator bypasses Python's). The profiler
    knows the size of a block only if it saw the block allocated, so fn runs twice in one
    session and only the second call counts: the gradients and buffers the second call frees
    were allocated by the first, in view (measured: ignoring those frees overstated an S2MoE
    layer's peak by its 64 MiB of gradients)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        with record_function("bench::measured"):
            fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    span = next(e for e in events if e.get("name") == "bench::measured" and e.get("ph") == "X")
    start, end = span["ts"], span["ts"] + span["dur"]
    deltas = sorted((e["ts"], e["args"]["Bytes"]) for e in events
                    if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
                    and start <= e["ts"] <= end)
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory fn allocates above what was live when it started (activations, gradients,
    temporaries), on CUDA from the caching allocator's counters, on CPU from the profiler."""
    if device.type == "cuda":
        fn()  # as on CPU: the measured call frees what an earlier call allocated
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _cpu_peak_bytes(fn)


def saved_for_backward_bytes(forward: Callable[[], object], exclude=()) -> int:
    """Bytes autograd keeps for backward across one forward: unique storages packed by the
    graph, less those of `exclude` (parameters, the input). In a deep model these add up layer
    after layer until backward starts, so they bound its peak more than one layer's transients."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(n for ptr, n in storages.items() if ptr not in skip)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(state.values()) for state in optimizer.state.values())


# ----------------------------------------------------------------------------- machine and output


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    import deepspeed
    info = {
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "loadavg_start": list(os.getloadavg()),
    }
    return info


# Dense (no sparsity) peak TFLOP/s by GPU name and dtype, from the vendors' data sheets: MFU's
# denominator. fp32 matrix work on these GPUs runs as TF32 when torch allows it, else far lower.
PEAK_TFLOPS = {"H200": {"bf16": 989.4, "fp32": 494.7}, "H100": {"bf16": 989.4, "fp32": 494.7},
               "A100": {"bf16": 312.0, "fp32": 156.0}}


def peak_tflops(device: torch.device, dtype: str) -> Optional[float]:
    """The device's dense peak for `dtype` ('bf16', 'fp32'), None where unknown (a CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(dtype)
    return None


def throughput(flops_per_token: float, tokens: int, seconds: float, peak: Optional[float]) -> dict:
    """Achieved TFLOP/s of `tokens` in `seconds` at `flops_per_token`, and MFU against `peak`."""
    tflops = flops_per_token * tokens / seconds / 1e12
    return {"flops_per_token": flops_per_token, "tflops": tflops, "mfu": None if peak is None else tflops / peak}


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, os.getcwd())
                                             if sys.executable.startswith(os.getcwd()) else sys.executable]
                    + sys.argv)


def target(name: str, measured: float, limit: float, higher_is_better: bool = False, basis: str = "") -> dict:
    ok = measured >= limit if higher_is_better else measured <= limit
    return {"target": name, "measured": measured, "limit": limit,
            "op": ">=" if higher_is_better else "<=", "pass": ok, "basis": basis}


def targets_table(targets: Sequence[dict]) -> str:
    return markdown_table(["target", "measured", "limit", "result", "basis"],
                          [[t["target"], f"{t['measured']:.3f}", f"{t['op']} {t['limit']}",
                            "PASS" if t["pass"] else "MISS", t["basis"]] for t in targets])


def fmt_time(t: Timing) -> str:
    q1, q3 = t.quantiles()
    return f"{t.median * 1e3:.1f} [{q1 * 1e3:.1f}, {q3 * 1e3:.1f}]"


def fmt_mib(nbytes: Optional[int]) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def timing_record(t: Timing, tokens: int) -> dict:
    q1, q3 = t.quantiles()
    return {"seconds": t.seconds, "median_s": t.median, "q1_s": q1, "q3_s": q3, "min_s": min(t.seconds),
            "max_s": max(t.seconds), "tokens_per_s": tokens / t.median}


def write_record(path: str, name: str, args: argparse.Namespace, device: torch.device, info: dict,
                 rows: List[dict], targets: Sequence[dict] = (), extra: Optional[dict] = None) -> dict:
    info = dict(info, loadavg_end=list(os.getloadavg()))
    record = {"benchmark": name, "command": command_line(), "args": vars(args), "machine": info, "rows": rows,
              "targets": list(targets), **(extra or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    return record


def finish(args: argparse.Namespace, name: str, device: torch.device, info: dict, rows: List[dict],
           targets: Sequence[dict] = (), extra: Optional[dict] = None) -> int:
    """A script's last step: the targets table (if any), the JSON record, where it went; the exit code."""
    if targets:
        print(targets_table(targets))
    write_record(args.json, name, args, device, info, rows, targets, extra)
    print(f"\nwrote {args.json}")
    return 0


def print_header(title: str, info: dict, device: torch.device, command: Optional[str] = None) -> None:
    print(f"## {title}\n")
    print(f"command: `{command or command_line()}`  ")
    print(f"machine: {info['cpu_count']} CPUs ({info['cpu']}), torch {info['torch']} "
          f"({info['torch_threads']} threads), deepspeed {info['deepspeed']}, device {info['device_name']}, "
          f"malloc {info.get('malloc', 'system')}, loadavg {', '.join(f'{v:.2f}' for v in info['loadavg_start'])}\n",
          flush=True)


def add_layer_shape_args(parser: argparse.ArgumentParser) -> None:
    """The MoE layer's size flags, with realistic defaults, shared by the layer-level benchmarks."""
    parser.add_argument("--d-model", type=int, default=512, help="hidden size")
    parser.add_argument("--d-inner", type=int, default=2048, help="hidden size of each expert FFN")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per call (before S2MoE's copy)")


def check_layer_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The layer shape flags positive, and every --k at most --experts."""
    check_positive(parser, args, ["d-model", "d-inner", "experts", "tokens", "k", "reps"])
    ks = args.k if isinstance(args.k, list) else [args.k]
    if max(ks) > args.experts:
        parser.error(f"--k: every k must be <= --experts ({args.experts}), got {args.k}")


def start_single_process(args: argparse.Namespace, title: str):
    """(device, dtype, machine info) for a one-process benchmark, with its header printed."""
    device = resolve_device(args)
    setup_single_process()
    info = {**machine(device), "malloc": args.malloc}
    print_header(title, info, device)
    return device, DTYPES[args.dtype], info
