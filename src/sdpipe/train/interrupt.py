"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM: a checkpoint at the next step boundary, then
`TrainingInterrupted`, which says where the run stopped; the command line prints how to resume it and exits
128 + the signal's number (130, 143). A second signal stops at once, without a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """A run stopped by a signal after writing a checkpoint of `step`."""

    def __init__(self, signum: int, step: int, steps: int, run_dir: Path, checkpoint: Path | None) -> None:
        self.signum, self.step, self.steps, self.run_dir, self.checkpoint = signum, step, steps, run_dir, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint is not None else f"the checkpoints in {run_dir}"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} of {steps}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While active (a context manager), SIGINT and SIGTERM only set `signum`; the loop stops at the next step
    boundary. Handlers can only be set from the main thread: elsewhere this does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second one: the previous behaviour, at once
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum
        name = signal.Signals(signum).name
        sys.stderr.write(f"\n{name}: stopping after this step with a checkpoint (again: stop at once, without one)\n")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
