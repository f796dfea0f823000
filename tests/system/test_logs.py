"""Logs a cluster user can read: with the output in a file (sbatch), a line per --log-interval and
a few lines per data preparation, no progress bar (whose carriage returns made a 13,000-step run's
log one 2 MB line); on a terminal, the bar."""

import io
import os
import re
import subprocess
import sys

import pytest

from s2moe_ds.config import ConfigError
from s2moe_ds.parallel import free_port
from s2moe_ds.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The documented line (docs/training.md, train/monitor.py), field by field.
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| loss (\d+\.\d{4}) \| lr (\d\.\d\de[+-]\d\d) \| tokens/s (\d+) "
                       r"\| eta (\d+):(\d\d):(\d\d)$")
EVAL_LINE = re.compile(r"^step \d+: valid bpc \d+\.\d+, nll_per_token \d+\.\d+$")
PREP_DONE = re.compile(r"^tokenizing embedded/(train|valid|test): done, \S+ char in \d+:\d\d:\d\d$")


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


class FakeEngine:
    def get_lr(self):
        return [1e-3]

    def get_global_grad_norm(self):
        return None


def test_a_redirected_run_logs_one_line_per_log_interval(tmp_path):
    """The launcher's output to a file, as sbatch leaves it: 30 steps, --log-interval 10."""
    log = tmp_path / "job.log"
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
           str(free_port()), os.path.join(ROOT, "launch", "pretrain.py"), "--deepspeed_config",
           os.path.join(ROOT, "ds_configs", "zero2.json"), "--preset", "tiny", "--ep-size", "2",
           "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "run"), "--max-steps", "30",
           "--log-interval", "10", "--eval-interval", "20", "--eval-max-batches", "2", "--save-interval", "0"]
    with open(log, "wb") as f:
        result = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = text.splitlines()
    steps = [STEP_LINE.match(line) for line in lines]
    steps = [m for m in steps if m]
    assert [(int(m[1]), int(m[2])) for m in steps] == [(10, 30), (20, 30), (30, 30)], text[-3000:]
    for m in steps:
        assert float(m[3]) > 0 and 0 < float(m[4]) < 1 and int(m[5]) > 0
    assert steps[-1].group(6, 7, 8) == ("0", "00", "00")  # nothing left at the last step
    # The training part of the log holds these lines and the evaluations', nothing per step.
    first = text.index(steps[0][0])
    region = text[first:text.index(steps[-1][0]) + len(steps[-1][0])].splitlines()
    assert all(STEP_LINE.match(line) or EVAL_LINE.match(line) for line in region), region
    assert len("\n".join(region)) / 30 < 20  # bytes per step (the bar wrote about 200)
    # The data preparation: one line per split, no bar.
    assert sorted(m[1] for m in map(PREP_DONE.match, lines) if m) == ["test", "train", "valid"], text[:3000]


def _monitor(tmp_path, stream, progress="auto", max_steps=5):
    from s2moe_ds.train.monitor import Monitor
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=max_steps, log_interval=2, progress=progress)
    return Monitor(cfg, is_writer=True, stream=stream)


def _train(monitor, steps):
    for step in range(1, steps + 1):
        monitor.train_step(step, FakeEngine(), 2.5, {}, {}, tokens=640, seconds=0.01)


@pytest.mark.parametrize("progress", ["auto", "bar"])
def test_a_terminal_gets_the_bar(tmp_path, capsys, progress):
    terminal = FakeTerminal() if progress == "auto" else io.StringIO()
    monitor = _monitor(tmp_path, terminal, progress)
    _train(monitor, 5)
    monitor.close(5, None)
    drawn = terminal.getvalue()
    assert "\r" in drawn and "5/5" in drawn and "train" in drawn
    assert not STEP_LINE.search(capsys.readouterr().out)


@pytest.mark.parametrize("progress", ["auto", "lines"])
def test_a_file_gets_lines(tmp_path, capsys, progress):
    stream = FakeTerminal() if progress == "lines" else io.StringIO()
    monitor = _monitor(tmp_path, stream, progress)
    _train(monitor, 5)
    monitor.close(5, None)
    assert stream.getvalue() == ""
    out = capsys.readouterr().out
    assert [int(m[1]) for m in map(STEP_LINE.match, out.splitlines()) if m] == [2, 4, 5]
    assert "step 2/5 | loss 2.5000 | lr 1.00e-03 | tokens/s 64000 | eta " in out


def test_the_bar_renews_its_loss_at_a_rate_not_every_step(tmp_path):
    monitor = _monitor(tmp_path, FakeTerminal(), max_steps=200)
    calls = []
    set_postfix = monitor.bar.set_postfix
    monitor.bar.set_postfix = lambda *a, **k: (calls.append(k), set_postfix(*a, **k))
    _train(monitor, 200)  # well under a second
    monitor.close(200, None)
    assert 1 <= len(calls) <= 2


def test_a_wrong_progress_mode_is_named():
    with pytest.raises(ConfigError, match=r"train\.progress: must be one of 'auto', 'bar', 'lines', got 'fancy'"):
        TrainConfig(progress="fancy")


def test_data_preparation_logs_a_line_per_tenth_in_a_file(capsys, monkeypatch):
    """A split large enough for a bar on a terminal (8 chunks or more) gets at most 11 lines in a file."""
    from s2moe_ds import progress
    from s2moe_ds.data import cache
    monkeypatch.setattr(cache, "CHUNK_CHARS", 1000)  # 100 chunks, as a 100 MB corpus has
    monkeypatch.setattr(progress, "_mode", "auto")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    text = bytes(range(256)) * 400
    reads = [text[i:i + 1024] for i in range(0, len(text), 1024)]  # the streamed reads of a split
    passed = cache._with_progress(iter(reads), "tokenizing big/train", len(text), "B")
    assert b"".join(passed) == text
    lines = capsys.readouterr().out.splitlines()
    assert [re.match(r"tokenizing big/train: (\d+)%", line)[1] for line in lines[:-1]] == \
        [str(p) for p in range(10, 100, 10)]
    assert re.match(r"tokenizing big/train: 10% \(\d+\.\dk/102k B\), elapsed \d+:\d\d:\d\d, eta \d+:\d\d:\d\d$", lines[0])
    assert lines[-1].startswith("tokenizing big/train: done, 102k B in ")
    assert sys.stderr.getvalue() == ""


def test_data_preparation_draws_a_bar_on_a_terminal(monkeypatch):
    from tqdm import tqdm

    from s2moe_ds import progress
    monkeypatch.setattr(progress, "_mode", "auto")
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    bar = progress.counter(100, "tokenizing x/train", "B")
    bar.update(100)
    bar.close()
    assert isinstance(bar, tqdm) and "\r" in sys.stderr.getvalue()
