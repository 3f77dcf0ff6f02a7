"""Ctrl-C while training: finish the current optimizer step, save a checkpoint, then stop.

A KeyboardInterrupt can land anywhere: between two parameter groups of an AdamW step, or between the
optimizer step and the EMA update, and a checkpoint taken there would mix two steps. So SIGINT only
raises a flag here; the loop reads it between optimizer steps, where the state is consistent, and
all ranks agree on that step (each process of a launch gets its own SIGINT, at slightly different
times). A second Ctrl-C interrupts at once, as usual.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C after saving its state in ``checkpoint`` (None: no step to save)."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"training interrupted at step {step}; state saved in {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


class InterruptFlag:
    """Context manager: SIGINT sets ``raised`` instead of raising (signals reach the main thread only,
    so elsewhere Ctrl-C keeps its usual meaning)."""

    def __init__(self):
        self.raised = False
        self.previous = None

    def __enter__(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            # getsignal is None for a handler installed outside Python; Python's own is the fallback.
            self.previous = signal.getsignal(signal.SIGINT) or signal.default_int_handler
            signal.signal(signal.SIGINT, self._note)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _note(self, signum, frame) -> None:
        self.raised = True
        signal.signal(signal.SIGINT, self.previous)  # a second Ctrl-C interrupts at once

    def agreed(self, accelerator) -> bool:
        """Whether any process was interrupted; a collective when several run (call it on every rank)."""
        if accelerator.num_processes == 1:
            return self.raised
        raised = torch.tensor([float(self.raised)], device=accelerator.device)
        return bool(accelerator.reduce(raised, reduction="sum").item() > 0)


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader worker initialiser: Ctrl-C reaches the whole process group, and a worker that died
    of it would fail the step the main process is finishing before it saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
