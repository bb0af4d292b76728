"""Preemption notices: the signals of preempt.signals only set a flag; the training loop reads it once per step
(in the per-step gather every rank already makes), so all ranks stop after the same step, save it and exit."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from lisa_dist.config import PreemptConfig


class PreemptionNotice:
    """Handlers for preempt.signals while installed; `received` is the first one's number (0: none yet)."""

    def __init__(self, config: PreemptConfig) -> None:
        self.signals = [signal.Signals[name] for name in config.signals]
        self.exit_code = config.exit_code
        self.received = 0
        self._previous: dict[signal.Signals, Any] = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum

    def __enter__(self) -> PreemptionNotice:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def stop_message(signum: int, step: str, saved: str, exit_code: int, resume: str) -> str:
    """What a run stopped by a preemption signal says, on either entry point (the CLI, the HF Trainer)."""
    return (f"{signal.Signals(signum).name} received; every rank stopped after {step} and saved {saved}. Exit "
            f"status {exit_code} asks for a requeue; {resume} continues from it")
