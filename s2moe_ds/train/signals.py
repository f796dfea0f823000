"""Stop signals (SLURM's pre-timeout SIGUSR1, preemption's SIGTERM) and what a run leaves for
its job script: a checkpoint, the REQUEUE marker and exit status 75."""

import signal
import threading

EXIT_REQUEUE = 75
"""Exit status of a run stopped by SIGUSR1/SIGTERM after checkpointing (EX_TEMPFAIL): requeue me."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

REQUEUE_MARKER = "REQUEUE"
"""Written in out_dir by rank 0 when a stop signal ended the run after a checkpoint."""


class StopRequest:
    """Remembers a stop signal; the loop acts on it at a step boundary, on every rank at once. The
    ranks agree in the vote each optimizer step takes with its losses (Trainer._vote), so a signal
    that comes after that vote (during the optimizer step, an evaluation or a checkpoint) is acted
    on one step later."""

    def __init__(self, enabled: bool) -> None:
        self.signal_name = None
        self._previous = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether this rank was signalled; SLURM may signal the ranks at different times, so the
        trainer's vote tells every rank whether any was."""
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
