"""DeepSpeed's own MoE unit tests on CPU, run with DeepSpeed's MoE and again with S2MoE swapped in.

    .venv/bin/python bench/deepspeed_moe_tests.py --deepspeed-tests /path/to/DeepSpeed/tests
    .venv/bin/python bench/deepspeed_moe_tests.py --deepspeed-tests DIR --impl s2moe -k "TestPRMoE" -x
    .venv/bin/python bench/deepspeed_moe_tests.py --deepspeed-tests DIR --s2moe noise_scale=0

DIR is a DeepSpeed checkout's tests/ folder (the one holding conftest.py and unit/), ideally of the
installed DeepSpeed's version; its files are run in place, never copied here. The tests run are
DeepSpeed's MoE layer tests (unit/v1/moe/test_moe.py, test_moe_tp.py), its MoE checkpoint tests
(unit/checkpoint/test_moe_checkpoint.py) and the two AutoEP tests that build its MoE layer.

Each implementation runs in its own pytest process, on DeepSpeed's CPU accelerator (gloo), with
this file loaded as a plugin in the pytest process and, through a sitecustomize.py on PYTHONPATH,
in every rank DeepSpeed's harness starts:
- 'deepspeed': DeepSpeed's MoE as installed;
- 's2moe': `deepspeed.moe.layer.MoE` replaced by s2moe_ds's S2MoE before any test module imports
  it, so `from deepspeed.moe.layer import MoE` (the tests' and their models') gets S2MoE with its
  defaults (noise, InfoNCE, mixing gate), or the S2MoE keyword arguments --s2moe gives.
In both, the fp16 cases run in bf16 (DeepSpeed's CPU accelerator has no fp16): a config's
"fp16" section becomes "bf16" (loss scaling, fp16's own, is dropped) and fp16 batches are cast to
bf16 at the engine's forward. And where the test source is older than the installed DeepSpeed,
the runner bridges the gap for both alike (_install_test_source_compat says what).

Prints a table (test, result with DeepSpeed's MoE, result with S2MoE, the reason of an expected
difference) and writes it as JSON (--json). Exit status 1 when a test that passes with DeepSpeed's
MoE fails with S2MoE without an expected reason, 2 for a bad argument.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

IMPLS = ("deepspeed", "s2moe")
IMPL_ENV = "S2MOE_DS_TESTS_IMPL"
KWARGS_ENV = "S2MOE_DS_TESTS_KWARGS"
RESULTS_ENV = "S2MOE_DS_TESTS_RESULTS"

TESTS = ("unit/v1/moe/test_moe.py",
         "unit/v1/moe/test_moe_tp.py",
         "unit/checkpoint/test_moe_checkpoint.py",
         "unit/v1/moe/test_autoep_integration.py::TestAutoEPOnly::test_zero3_native_moe_rejected_2gpu",
         "unit/v1/moe/test_autoep_unit.py::TestAutoEPConfig::test_zero3_compatibility_gate_rejects_native_moe")

# Tests whose S2MoE result may differ from DeepSpeed's MoE's, by node-id prefix, and why.
EXPECTED = {
    "unit/v1/moe/test_moe.py::TestExpertWeightGradWithZero::":
        "compares the expert gradients of an ep_size 1 and an ep_size 2 model on one batch to rtol 1e-4; "
        "each S2MoE layer draws its own Gaussian noise (the two models draw different samples from the "
        "RNG, one after the other) and InfoNCE its own token sample, so the noisy copies and the "
        "gradients differ by design; with --s2moe noise_scale=0 uncertainty_coef=0 the copies are "
        "deterministic and it passes",
}

SITECUSTOMIZE = """\
import os
if os.environ.get({env!r}):
    from bench.deepspeed_moe_tests import install
    install()
"""


# ----------------------------------------------------------------------------- in the test processes


def _bf16_config(config):
    """A DeepSpeed config dict with its enabled fp16 section replaced by bf16 (CPU has no fp16)."""
    if not isinstance(config, dict) or not config.get("fp16", {}).get("enabled", False):
        return config
    out = {key: value for key, value in config.items() if key != "fp16"}
    out["bf16"] = {"enabled": True}
    return out


def _install_bf16_for_fp16() -> None:
    import deepspeed
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    initialize = deepspeed.initialize

    def initialize_in_bf16(*args, **kwargs):
        for key in ("config", "config_params"):
            if key in kwargs:
                kwargs[key] = _bf16_config(kwargs[key])
        return initialize(*args, **kwargs)

    forward = DeepSpeedEngine.forward

    def forward_in_bf16(self, *inputs, **kwargs):
        # The tests' batches are fp16 (their dataloaders take the dtype the fp16 case names).
        if self.bfloat16_enabled():
            inputs = tuple(x.to(torch.bfloat16) if torch.is_tensor(x) and x.dtype == torch.float16 else x
                           for x in inputs)
        return forward(self, *inputs, **kwargs)

    deepspeed.initialize = initialize_in_bf16
    DeepSpeedEngine.forward = forward_in_bf16


def _install_test_source_compat() -> None:
    """DeepSpeed's checkpoint tests (master of 2026-08, its newest stored snapshot) compare
    engine.sparse_tensor_module_names, which 0.19.8 dropped (it finds sparse gradients at run
    time): both engines get an empty one, so that the tests reach what they check."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    if not hasattr(DeepSpeedEngine, "sparse_tensor_module_names"):
        DeepSpeedEngine.sparse_tensor_module_names = frozenset()


def _s2moe_class(kwargs: Dict):
    from s2moe_ds.moe.blocks.s2moe import S2MoE
    if not kwargs:
        return S2MoE

    class S2MoEWithKwargs(S2MoE):
        """S2MoE with the runner's --s2moe keyword arguments as defaults."""

        def __init__(self, *args, **overrides):
            super().__init__(*args, **{**kwargs, **overrides})

    return S2MoEWithKwargs


def install() -> None:
    """Applied in every process of a run (the pytest process and each rank): bf16 for fp16 and, for
    the 's2moe' implementation, S2MoE as `deepspeed.moe.layer.MoE`. Idempotent."""
    import deepspeed
    from deepspeed.moe import layer
    if getattr(deepspeed, "_s2moe_ds_tests_installed", False):
        return
    deepspeed._s2moe_ds_tests_installed = True
    _install_bf16_for_fp16()
    _install_test_source_compat()
    if os.environ.get(IMPL_ENV) == "s2moe":
        _swap_moe(layer, _s2moe_class(json.loads(os.environ.get(KWARGS_ENV) or "{}")))


def _swap_moe(layer, cls) -> None:
    """`deepspeed.moe.layer.MoE` becomes `cls`. DeepSpeed's own __init__ calls `super(MoE, self)`,
    with MoE looked up in that module at call time: it gets a copy that still finds its own class."""
    original = layer.MoE
    init = original.__init__
    scope = {**init.__globals__, "MoE": original}
    own = types.FunctionType(init.__code__, scope, init.__name__, init.__defaults__, init.__closure__)
    own.__kwdefaults__ = init.__kwdefaults__
    original.__init__ = functools.update_wrapper(own, init)
    layer.MoE = cls


# ----------------------------------------------------------------------------- pytest plugin hooks

_RESULTS: Dict[str, Dict] = {}


def pytest_configure(config) -> None:
    if os.environ.get(IMPL_ENV):
        install()


def _message(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.splitlines()[0][:300] if crash.message else ""
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[2])[:300]
    return str(report.longrepr or "").splitlines()[-1][:300] if report.longrepr else ""


def pytest_runtest_logreport(report) -> None:
    previous = _RESULTS.get(report.nodeid)
    if report.when == "call" or report.outcome != "passed":
        if previous is None or previous["outcome"] == "passed":
            outcome = report.outcome if report.when == "call" or report.outcome == "skipped" else "error"
            _RESULTS[report.nodeid] = {"outcome": outcome, "message": _message(report) if outcome != "passed" else "",
                                       "seconds": round(report.duration, 1)}
            _write_results()  # after every test, so that a run stopped early still reports


def _write_results() -> None:
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(_RESULTS, f, indent=1)
        os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- the runner


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _check_tests_dir(path: str) -> str:
    path = os.path.abspath(path)
    missing = [name for name in ("conftest.py", "unit/common.py", "unit/simple_model.py") if
               not os.path.isfile(os.path.join(path, name))]
    if missing:
        _fail(f"--deepspeed-tests {path}: not a DeepSpeed tests/ folder (no {', '.join(missing)}); "
                         "give the tests/ folder of a DeepSpeed checkout, e.g. "
                         "git archive v0.19.8 tests | tar x -C /tmp/ds")
    return path


def _parse_kwargs(items: List[str]) -> Dict:
    from s2moe_ds.moe.blocks.s2moe import S2MoEConfig
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in S2MoEConfig.__dataclass_fields__:
            _fail(f"--s2moe {item!r}: expected FIELD=VALUE with FIELD one of S2MoEConfig's "
                             f"({', '.join(S2MoEConfig.__dataclass_fields__)})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a string setting, e.g. noise_stats=global
    from s2moe_ds.config import ConfigError
    try:
        S2MoEConfig(**out)
    except ConfigError as e:
        _fail(f"--s2moe: {e}")
    return out


def _environment(impl: str, kwargs: Dict, results: str, site_dir: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({IMPL_ENV: impl, KWARGS_ENV: json.dumps(kwargs), RESULTS_ENV: results,
                "PYTHONPATH": os.pathsep.join([site_dir, ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
                # DeepSpeed's harness skips a world size above the accelerator count, which on CPU
                # is LOCAL_SIZE (else the socket count).
                "LOCAL_SIZE": "4"})
    if "TORCH_EXTENSIONS_DIR" not in env:
        from tests.conftest import _extensions_dir  # the suite's JIT builds, reused
        env["TORCH_EXTENSIONS_DIR"] = _extensions_dir()
    return env


def run_impl(impl: str, tests_dir: str, tests: List[str], pytest_args: List[str], kwargs: Dict,
             timeout_s: int) -> Dict[str, Dict]:
    """One pytest process running `tests` with `impl`; {node id: {outcome, message, seconds}}."""
    with tempfile.TemporaryDirectory(prefix="s2moe-ds-tests-") as tmp:
        with open(os.path.join(tmp, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE.format(env=IMPL_ENV))
        results = os.path.join(tmp, "results.json")
        # Its own --basetemp: DeepSpeed's harness keeps its rendezvous files there, out of reach of
        # other pytest runs' clean-up of old temporary folders.
        cmd = [sys.executable, "-m", "pytest", "-c", os.path.join(tests_dir, "pytest.ini"), "--rootdir", tests_dir,
               "--basetemp", os.path.join(tmp, "basetemp"), "-p", "bench.deepspeed_moe_tests",
               "-p", "no:cacheprovider", "-q", *pytest_args, *tests]
        print(f"[{impl}] {' '.join(cmd)}", flush=True)
        start = time.time()
        log = os.path.join(tmp, "pytest.log")
        with open(log, "w") as out:
            try:
                proc = subprocess.run(cmd, cwd=tests_dir, env=_environment(impl, kwargs, results, tmp), stdout=out,
                                      stderr=subprocess.STDOUT, timeout=timeout_s)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = f"timeout after {timeout_s} s: the results so far"
        print(f"[{impl}] pytest exit {code} in {time.time() - start:.0f} s", flush=True)
        if not os.path.exists(results):
            with open(log) as f:
                print(f.read()[-4000:])
            _fail(f"the {impl} run wrote no results (pytest exit {code}); see above")
        with open(results) as f:
            return json.load(f)


def _reason(nodeid: str) -> str:
    return next((why for prefix, why in EXPECTED.items() if nodeid.startswith(prefix)), "")


def compare(results: Dict[str, Dict[str, Dict]]) -> List[Dict]:
    """One row per test: each implementation's outcome, whether they differ, and the expected reason."""
    nodeids = sorted({n for per_impl in results.values() for n in per_impl})
    rows = []
    for nodeid in nodeids:
        row = {"test": nodeid}
        for impl in results:
            r = results[impl].get(nodeid, {"outcome": "not run", "message": ""})
            row[impl] = r["outcome"]
            row[impl + "_message"] = r["message"]
        ds, s2 = row.get("deepspeed"), row.get("s2moe")
        row["reason"] = _reason(nodeid) if ds and s2 and ds != s2 else ""
        row["unexpected"] = bool(ds == "passed" and s2 not in (None, "passed") and not row["reason"])
        rows.append(row)
    return rows


def summary(rows: List[Dict], impls) -> str:
    lines = []
    for impl in impls:
        counts = {}
        for row in rows:
            counts[row[impl]] = counts.get(row[impl], 0) + 1
        lines.append(f"{impl}: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))
    return "\n".join(lines)


def _table(rows: List[Dict], impls) -> str:
    from s2moe_ds.tables import markdown_table
    headers = ["test", *(f"{impl} MoE" if impl == "deepspeed" else "S2MoE" for impl in impls), "why they differ"]
    body = []
    for row in rows:
        cells = [row["test"].replace("unit/", "", 1)]
        for impl in impls:
            cell = row[impl]
            if row[impl] in ("failed", "error") and row[impl + "_message"]:
                cell += ": " + row[impl + "_message"][:120].replace("|", "/")
            cells.append(cell)
        reason = row["reason"] or ("UNEXPECTED" if row["unexpected"] else "")
        body.append([*cells, reason])
    return markdown_table(headers, body)


def _load_results(path: str) -> Dict[str, Dict]:
    try:
        with open(path) as f:
            return json.load(f)["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        _fail(f"--reuse {path}: not a --json file of this runner ({e}); run without --reuse")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed-tests", required=True, metavar="DIR",
                        help="a DeepSpeed checkout's tests/ folder (holding conftest.py and unit/)")
    parser.add_argument("--impl", choices=("both", *IMPLS), default="both", help="which MoE to run the tests with")
    parser.add_argument("-k", default=None, help="pytest -k expression selecting tests")
    parser.add_argument("-x", action="store_true", help="stop each run at its first failure")
    parser.add_argument("--tests", nargs="+", default=list(TESTS), metavar="NODE",
                        help="test files or node ids, relative to DIR (default: the MoE tests listed above)")
    parser.add_argument("--s2moe", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="S2MoE keyword arguments for the swapped-in layer, e.g. noise_scale=0")
    parser.add_argument("--timeout-s", type=int, default=7200, help="wall-clock limit of each pytest run")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the rows and the command here")
    parser.add_argument("--reuse", default=None, metavar="FILE",
                        help="start from an earlier --json's results: the tests run now replace theirs")
    args = parser.parse_args(argv)
    tests_dir = _check_tests_dir(args.deepspeed_tests)
    kwargs = _parse_kwargs(args.s2moe)
    impls = IMPLS if args.impl == "both" else (args.impl,)
    pytest_args = (["-k", args.k] if args.k else []) + (["-x"] if args.x else [])
    earlier = _load_results(args.reuse) if args.reuse else {}
    results = {impl: dict(earlier.get(impl, {})) for impl in IMPLS if impl in impls or impl in earlier}
    for impl in impls:
        results[impl].update(run_impl(impl, tests_dir, args.tests, pytest_args, kwargs, args.timeout_s))
    impls = tuple(results)
    rows = compare(results)
    print(_table(rows, impls))
    print(summary(rows, impls))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv, "s2moe_kwargs": kwargs, "results": results, "rows": rows}, f, indent=1)
    unexpected = [row["test"] for row in rows if row["unexpected"]]
    if unexpected:
        print("unexpected differences (pass with DeepSpeed's MoE, not with S2MoE):\n  " + "\n  ".join(unexpected))
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
