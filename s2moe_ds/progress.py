"""Progress for a person at a terminal or for a log file: a tqdm bar on a terminal, plain lines
otherwise. A bar redraws itself with carriage returns, so in a batch job's log file it becomes one
line of megabytes that `tail -f`, `grep` and log viewers cannot use.

The mode is 'auto' (a bar when the bar's stream, stderr, is a terminal), 'bar' or 'lines'. The
trainer sets the process's mode from `--progress` before it prepares data, so the data
preparation and the training loop agree.
"""

import sys
import time
from typing import Optional, TextIO

MODES = ("auto", "bar", "lines")

_mode = "auto"


def set_mode(mode: str) -> None:
    """The process's progress mode (one of MODES; TrainConfig checks a user's value)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def use_bar(stream: Optional[TextIO] = None, mode: Optional[str] = None) -> bool:
    """Whether to draw a bar on `stream` (default: stderr, where tqdm draws)."""
    mode = _mode if mode is None else mode
    if mode != "auto":
        return mode == "bar"
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def clock(seconds: float) -> str:
    """H:MM:SS, hours unbounded (a week is 168:00:00), as the log lines show durations."""
    whole = max(0, int(round(seconds)))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _size(n: float) -> str:
    from tqdm import tqdm
    return tqdm.format_sizeof(n)


class FractionLines:
    """A bar's stand-in for a log file: a line at every `step_percent` of `total`, one when done.

    Lines per tenth of the work, not per time: a file then gets at most 11 lines per bar whatever
    the corpus size or the machine's speed, and each line's elapsed time and ETA show the pace. A
    total below `quiet_below` prints only the final line (small splits are done in a blink).
    """

    def __init__(self, total: int, desc: str, unit: str, out: Optional[TextIO] = None, step_percent: int = 10,
                 quiet_below: int = 0) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.out = out
        self.step_percent = step_percent
        self.quiet = total < quiet_below
        self.done = 0
        self.shown_percent = 0
        self.start = time.perf_counter()

    def _print(self, text: str) -> None:
        print(text, file=self.out if self.out is not None else sys.stdout, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.quiet or self.total <= 0:
            return
        percent = min(100, 100 * self.done // self.total)
        if percent >= 100 or percent < self.shown_percent + self.step_percent:
            return  # 100% is the final line's
        self.shown_percent = percent - percent % self.step_percent
        elapsed = time.perf_counter() - self.start
        eta = elapsed * (self.total - self.done) / max(self.done, 1)
        self._print(f"{self.desc}: {self.shown_percent}% ({_size(self.done)}/{_size(self.total)} {self.unit}), "
                    f"elapsed {clock(elapsed)}, eta {clock(eta)}")

    def close(self) -> None:
        self._print(f"{self.desc}: done, {_size(self.done)} {self.unit} in {clock(time.perf_counter() - self.start)}")


def counter(total: int, desc: str, unit: str, quiet_below: int = 0):
    """A progress counter with update(n) and close(): a tqdm bar on a terminal (none below
    `quiet_below`, as before), FractionLines in a log."""
    if use_bar():
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=total < quiet_below, leave=False)
    return FractionLines(total, desc, unit, quiet_below=quiet_below)
