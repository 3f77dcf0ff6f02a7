"""The job queue: one worker thread runs jobs first in, first out, one generation at a time.

A job is a ``JobRequest`` (the ``GenerationSettings`` of one batch, how many batches, whether to
save) and its state: queued -> running -> done | failed | cancelled. The queue is bounded: a full
queue refuses at once (``QueueFull``, a 429 with ``Retry-After``), it never makes a client hang.
Stopping is cooperative: ``interrupt``, ``skip`` and ``cancel`` set a flag that the step callback
reads after every step (``ldm.server.engine``). A job that fails records its error and fails alone;
the worker goes on with the next. The web layer only submits, reads and flags jobs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ldm.errors import LdmError
from ldm.images import GenerationParameters
from ldm.settings import GenerationSettings

if TYPE_CHECKING:
    from PIL import Image

    from ldm.server.catalog import ModelEntry
    from ldm.server.engine import Engine

log = logging.getLogger("ldm.server")

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class JobRequest:
    """What a job makes: ``n_iter`` batches of ``settings`` (its seed is the first image's, resolved)."""

    settings: GenerationSettings
    n_iter: int = 1
    save: bool = False  # write each image under the server's --outputs
    model: ModelEntry | None = None  # A1111's override_settings.sd_model_checkpoint; None: the loaded model
    restore_model: bool = True  # with ``model``: serve the loaded model again afterwards (A1111's default)

    @property
    def seeds(self) -> list[int]:
        """Every image's seed, in order: batch k continues where batch k - 1 ended (A1111's rule;
        ``GenerationSettings.image_seed``)."""
        return [self.settings.image_seed(i) for i in range(self.settings.batch * self.n_iter)]


@dataclass(eq=False)  # a job is itself: the queue finds it by identity, not by comparing images
class Job:
    """One job and what it has made so far; written by the worker, read by the web layer."""

    request: JobRequest
    id: str = field(default_factory=lambda: uuid.uuid4().hex)  # random: unique across server processes
    state: JobState = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    batch: int = 0  # the batch running (0-based)
    step: int = 0  # steps done of the running batch
    steps: int = 0  # steps of each batch
    preview: Image.Image | None = None  # the running batch's first image as it denoises (1/8 size)
    images: list[Image.Image] = field(default_factory=list)
    parameters: list[GenerationParameters] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)
    error: Exception | None = None
    interrupted: bool = False  # stop after the current step; keep what was made (A1111's interrupt)
    skipped: bool = False  # stop the current batch, keep its images, go on with the next (A1111's skip)
    cancelled: bool = False  # stop and keep nothing
    inpainting_conditioning: bool = False  # the model's U-Net reads a mask (an inpainting model)
    version: int = 0  # bumped on every change (server-sent events send each)
    done: threading.Event = field(default_factory=threading.Event)
    _waiters: list[Callable[[], None]] = field(default_factory=list)  # called once, when the job finishes
    _waiters_lock: threading.Lock = field(default_factory=threading.Lock)

    def when_finished(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the worker's thread) when the job finishes; at once if it has."""
        with self._waiters_lock:
            if not self.done.is_set():
                self._waiters.append(callback)
                return
        callback()

    def mark_finished(self) -> None:
        """Set ``done`` and call the waiters (the worker, once the job's state is final)."""
        with self._waiters_lock:
            self.done.set()
            waiters, self._waiters = self._waiters, []
        for callback in waiters:
            callback()

    @property
    def stop_requested(self) -> bool:
        return self.interrupted or self.skipped or self.cancelled

    @property
    def progress(self) -> float:
        """Fraction of the job's steps done, 0 to 1."""
        if self.state == "done":
            return 1.0
        if not self.steps:
            return 0.0
        return min(1.0, (self.batch + self.step / self.steps) / self.request.n_iter)

    @property
    def eta(self) -> float:
        """Seconds left, from the pace so far (0 before the first step)."""
        if self.started is None or not self.progress or self.finished is not None:
            return 0.0
        elapsed = time.time() - self.started
        return elapsed / self.progress - elapsed

    def changed(self, **values) -> None:
        for name, value in values.items():
            setattr(self, name, value)
        self.version += 1


class JobCrashed(Exception):
    """A job failed of a bug (not a user's mistake); its traceback is in the server's log, not in the answer."""

    def __init__(self, job: Job):
        super().__init__(f"job {job.id} failed: {type(job.error).__name__}")
        self.job = job


class QueueFull(Exception):
    """The queue holds ``--queue-size`` jobs; ``retry_after`` is an estimate in whole seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class JobQueue:
    """Bounded FIFO of jobs and the one worker thread that runs them on ``engine``."""

    def __init__(self, engine: Engine, size: int, history: int = 32):
        self.engine = engine
        self.size = size
        self.history = history
        self.current: Job | None = None
        self._waiting: deque[Job] = deque()
        self._finished: OrderedDict[str, Job] = OrderedDict()
        self._durations: deque[float] = deque(maxlen=20)
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="ldm-server-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the worker after the running job (which is cancelled); waiting jobs are cancelled."""
        with self._condition:
            self._closed = True
            for job in self._waiting:
                self._finish(job, "cancelled")
            self._waiting.clear()
            if self.current is not None:
                self.current.cancelled = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # --- what the web layer does -------------------------------------------------------------------

    def submit(self, request: JobRequest) -> Job:
        """Queue a job; ``QueueFull`` at once when ``size`` jobs already wait."""
        with self._condition:
            if len(self._waiting) >= self.size:
                raise QueueFull(self.retry_after())
            job = Job(request)
            self._waiting.append(job)
            self._condition.notify_all()
            return job

    def get(self, job_id: str) -> Job | None:
        with self._condition:
            if self.current is not None and self.current.id == job_id:
                return self.current
            return next((job for job in self._waiting if job.id == job_id), None) or self._finished.get(job_id)

    def jobs(self) -> list[Job]:
        """The running job, then the waiting ones in order."""
        with self._condition:
            return ([self.current] if self.current is not None else []) + list(self._waiting)

    def position(self, job: Job) -> int | None:
        """Jobs ahead of a waiting ``job`` (0: it runs next); None once it runs."""
        with self._condition:
            return self._waiting.index(job) if job in self._waiting else None

    def cancel(self, job: Job) -> None:
        """A waiting job is dropped; the running one stops after its current step, keeping nothing."""
        with self._condition:
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, "cancelled")
            elif job.state == "running":
                job.changed(cancelled=True)

    def interrupt(self) -> None:
        """A1111's interrupt: the running job stops after its current step, with the images so far."""
        with self._condition:
            if self.current is not None:
                self.current.changed(interrupted=True)

    def skip(self) -> None:
        """A1111's skip: the running job's current batch stops; the next batch (``n_iter``) runs."""
        with self._condition:
            if self.current is not None:
                self.current.changed(skipped=True)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the recent mean job time, at least 1."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean))

    # --- the worker --------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                job = self.current = self._waiting.popleft()
                job.changed(state="running", started=time.time())
            self._run(job)

    def _run(self, job: Job) -> None:
        try:
            self.engine.run(job)
            state = "cancelled" if job.cancelled else "done"
        except Exception as error:  # noqa: BLE001 - a failing job fails alone; the worker goes on
            if not isinstance(error, LdmError):  # a user's mistake needs no traceback in the log
                log.exception("job %s failed", job.id)
            job.error = error
            state = "failed"
        with self._condition:
            self.current = None
            self._durations.append(time.time() - job.started)
            self._finish(job, state)

    def _finish(self, job: Job, state: JobState) -> None:
        """Record ``job`` as finished (with the condition held); the oldest beyond ``history`` is forgotten."""
        job.changed(state=state, finished=time.time())
        self._finished[job.id] = job
        while len(self._finished) > self.history:
            self._finished.popitem(last=False)
        job.mark_finished()
