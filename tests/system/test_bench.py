"""Smoke runs of the bench/ scripts at tiny sizes: each runs from the command line, prints its
table and writes a JSON record with the expected rows and positive numbers. No timing assertions:
the numbers of a few-millisecond run on a shared machine mean nothing."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYER = ["--d-model", "16", "--d-inner", "32", "--experts", "4", "--tokens", "64"]
FAST = ["--warmup", "1", "--reps", "2"]


def _run(script, args, tmp_path):
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", f"{script}.py"), *args, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["benchmark"] == script and script in record["command"]
    machine = record["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and machine["deepspeed"]
    assert len(machine["loadavg_start"]) == 3 and len(machine["loadavg_end"]) == 3
    assert "| --- |" in proc.stdout  # the markdown table
    return record, proc.stdout


def _assert_timed(row):
    assert row["median_s"] > 0 and row["tokens_per_s"] > 0 and row["q1_s"] <= row["q3_s"]


def _assert_targets(record, count):
    assert len(record["targets"]) == count
    for t in record["targets"]:
        assert t["measured"] > 0 and isinstance(t["pass"], bool)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bench_layer(tmp_path, dtype):
    record, stdout = _run("bench_layer", [*LAYER, *FAST, "--dtype", dtype], tmp_path)
    rows = {r["variant"]: r for r in record["rows"]}
    assert set(rows) == {"s2moe-k1", "s2moe-k2", "dsmoe-k1", "dsmoe-k2", "dsmoe-k2-2T", "dense-1x", "dense-2x",
                         "dense-4x"}
    assert rows["dsmoe-k2-2T"]["tokens"] == 2 * rows["dsmoe-k2"]["tokens"]
    assert record["derived"]["s2moe_k2_over_dsmoe_k2_2T"]["median"] > 0
    for row in rows.values():
        _assert_timed(row)
        assert row["peak_bytes"] > 0 and row["saved_for_backward_bytes"] > 0
    # Each MoE variant is compared with the dense FFN of its active expert width.
    assert rows["s2moe-k2"]["dense_reference"] == "dense-4x" and rows["dsmoe-k2"]["dense_reference"] == "dense-2x"
    _assert_targets(record, 7)
    assert "PASS" in stdout or "MISS" in stdout


def test_bench_experts(tmp_path):
    record, stdout = _run("bench_experts", [*LAYER, *FAST], tmp_path)
    rows = {r["variant"]: r for r in record["rows"]}
    assert set(rows) == {f"{kind}-{impl}-{mode}" for kind in ("dsmoe", "s2moe") for impl in ("loop", "batched")
                         for mode in ("train", "eval")}
    for row in rows.values():
        _assert_timed(row)
    assert rows["s2moe-batched-train"]["time_vs_loop"]["median"] > 0
    _assert_targets(record, 2)


def _write_wheel(path, module, version):
    """A one-module wheel, written by hand (no build tools, no index)."""
    import zipfile
    dist = f"{module}-{version}.dist-info"
    files = {f"{module}.py": '"""A probe the GPU suite installs."""\n',
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


def test_gpu_suite_dry_run(tmp_path):
    """Every step of the GPU suite runs on the CPU at tiny sizes, through the wheel install, and
    the report holds each step's status and tables."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _write_wheel(wheels / "s2moe_wheel_probe-1.0-py3-none-any.whl", "s2moe_wheel_probe", "1.0")
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--dry-run", "--wheels",
                           str(wheels), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    record = json.loads((out / "gpu_suite.json").read_text())
    names = [s["name"] for s in record["steps"]]
    assert names == ["wheels", "tests", "experts-paper-small", "experts-small", "layer", "step-paper-small",
                     "step-gpu-sized", "inference"]
    assert all(s["status"] == "ok" for s in record["steps"]) and record["info"]["dry_run"]
    assert (out / "site" / "s2moe_wheel_probe.py").exists()
    text = (out / "gpu_suite.md").read_text()
    assert "DRY RUN" in text and "| step | variant | tokens/s | TFLOP/s | MFU |" in text
    assert all(f"## {name}" in text for name in names[1:])
    # Without a GPU and without --dry-run, the suite refuses before running anything.
    refused = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--out",
                              str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--dry-run" in refused.stderr


def test_bench_step(tmp_path):
    record, _ = _run("bench_step", ["--presets", "tiny", "--tokens", "128", *FAST], tmp_path)
    rows = {r["variant"]: r for r in record["rows"]}
    assert set(rows) == {"smoe-k2", "s2moe-k2", "s2moe-k1", "s2moe-lite-k2", "dense"}
    for row in rows.values():
        _assert_timed(row)
        assert row["tokens"] == 128 and row["state_bytes"] > 0 and row["total_peak_bytes"] > row["state_bytes"]
    assert rows["smoe-k2"]["time_vs_smoe_k2"]["median"] == pytest.approx(1.0)
    # The lite form has SMoE's weights and FLOPs (InfoNCE is not counted) and no noisy dispatch.
    assert rows["s2moe-lite-k2"]["params"] == rows["smoe-k2"]["params"] < rows["s2moe-k2"]["params"]
    assert rows["s2moe-lite-k2"]["flops_per_token"] == rows["smoe-k2"]["flops_per_token"]
    _assert_targets(record, 2)


def test_bench_inference(tmp_path):
    args = ["--preset", "tiny", "--batch", "2", "--seq-len", "32", "--balance-steps", "2", *FAST]
    record, _ = _run("bench_inference", args, tmp_path)
    rows = {r["variant"]: r for r in record["rows"]}
    assert set(rows) == {"nodrop/eval_k1", "nodrop/eval_k2", "cap1.0/eval_k1", "cap1.0/eval_k2"}
    for row in rows.values():
        _assert_timed(row)
        assert row["expert_padding"] >= 1.0 - 1e-9
    assert rows["cap1.0/eval_k1"]["expert_padding"] == pytest.approx(1.0, abs=0.2)
    assert 0 < record["analytic_cost_ratio"] < 1 and len(record["balance_loss_curve"]) == 2
    _assert_targets(record, 2)


def test_bench_comm(tmp_path):
    record, _ = _run("bench_comm", [*LAYER, "--timeout", "300"], tmp_path)
    rows = {(r["variant"], r["phase"]): r for r in record["rows"]}
    assert {v for v, _ in rows} == {"s2moe-k1", "s2moe-k2", "dsmoe-k1", "dsmoe-k2"}
    for (variant, phase), row in rows.items():
        # A dispatch and a combine each way, whatever the variant (docs/method.md: one pair per layer).
        assert row["all_to_all_calls"] == 2 and row["all_to_all_bytes_per_rank"] > 0, (variant, phase)
    # S2MoE sends both copies in one dispatch: the buffers of DeepSpeed's MoE at twice the routes.
    assert (rows[("s2moe-k1", "forward")]["all_to_all_bytes_per_rank"]
            == rows[("dsmoe-k2", "forward")]["all_to_all_bytes_per_rank"])
    _assert_targets(record, 3)


def test_bench_overhead(tmp_path):
    record, stdout = _run("bench_overhead", [*LAYER, *FAST, "--profile"], tmp_path)
    rows = {r["variant"]: r for r in record["rows"]}
    assert set(rows) == {"s2moe", "s2moe-plain", "s2moe-no-lu", "smoe-2T", "noise+concat", "info_nce",
                         "gate+mix", "noise+concat (plain)", "info_nce (plain)", "gate+mix (plain)"}
    for row in rows.values():
        _assert_timed(row)
    assert record["profile_top_ops"] and all(op["self_cpu_ms"] >= 0 for op in record["profile_top_ops"])
    assert "uncertainty_loss_share" in record["derived"] and record["derived"]["plain_over_fused_peak"] > 0
    assert rows["s2moe"]["peak_bytes"] > 0 and rows["info_nce"]["peak_bytes"] is None


def test_flags_are_checked_with_their_name(tmp_path):
    script = os.path.join(ROOT, "bench", "bench_layer.py")
    cmd = [sys.executable, script, "--tokens", "0", "--json", str(tmp_path / "x")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--tokens" in proc.stderr
