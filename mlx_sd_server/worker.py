"""The worker: one thread owns the engine and runs jobs one at a time from a bounded queue.

MLX work is not shared between threads, and one image server saturates the GPU with a single job,
so a queue in front of one thread is both the simplest and the fastest arrangement. A task can be
cancelled at any time; the worker notices between denoising steps and delivers nothing.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable

from PIL import Image

from mlx_sd_server.engine.pipeline import Step, drive
from mlx_sd_server.job import Job, JobError

log = logging.getLogger("mlx_sd_server.worker")


class QueueFullError(RuntimeError):
    """More jobs are waiting than the server accepts (HTTP 429)."""


class JobCancelled(Exception):
    """The task was cancelled (its client went away) before it finished."""


class Task:
    """A submitted job: its progress, its result (a concurrent Future) and a way to cancel it."""

    _ids = itertools.count(1)

    def __init__(self, job: Job, finish: Callable[[list[Image.Image]], Any] | None):
        self.id = next(self._ids)
        self.job = job
        self.finish = finish
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.steps_done = 0
        self.total_steps: int | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()
        self.future.cancel()  # only takes effect while still queued; a running task checks the event

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def progress(self) -> dict:
        return {"task": self.id, "model": self.job.model, "steps_done": self.steps_done,
                "total_steps": self.total_steps}


class Worker:
    """Runs `registry.pipeline(job.model).generate(job)` for each submitted job, in submission order."""

    def __init__(self, registry: Any, max_queue: int = 8):
        self.registry = registry
        self.max_queue = max_queue
        self._queue: queue.Queue[Task | None] = queue.Queue(maxsize=max_queue)
        self._running: Task | None = None
        self._thread = threading.Thread(target=self._loop, name="mlx-sd-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel everything queued and running, and wait for the thread to finish its current step."""
        while True:
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task.cancel()
        if self._running is not None:
            self._running.cancel()
        self._queue.put(None)
        self._thread.join()

    def submit(self, job: Job, finish: Callable[[list[Image.Image]], Any] | None = None) -> Task:
        """Queue a job. `finish` runs on the worker thread with the images (e.g. to encode them), and
        its return value becomes the task's result. Raises QueueFullError when the queue is full."""
        task = Task(job, finish)
        try:
            self._queue.put_nowait(task)
        except queue.Full:
            raise QueueFullError(f"{self.max_queue} jobs are already waiting; try again later") from None
        return task

    def status(self) -> dict:
        running = self._running
        return {"waiting": self._queue.qsize(), "max_waiting": self.max_queue,
                "running": running.progress() if running is not None else None}

    def _loop(self) -> None:
        while (task := self._queue.get()) is not None:
            if not task.future.set_running_or_notify_cancel():
                log.info("task %d cancelled while queued", task.id)
                continue
            self._running = task
            try:
                self._run(task)
            finally:
                self._running = None

    def _run(self, task: Task) -> None:
        job = task.job
        started = time.monotonic()
        engine = "?"
        outcome = "failed"
        try:
            pipeline = self.registry.pipeline(job.model)
            engine = type(pipeline).__name__  # DiffusionPipeline (MLX) or TorchPipeline
            task.total_steps = pipeline.total_steps(job)
            images = self._denoise(task, pipeline)
            result = task.finish(images) if task.finish else images
            if task.cancelled:
                raise JobCancelled()
            task.future.set_result(result)
            outcome = "done"
        except JobCancelled as cancelled:
            outcome = "cancelled"
            task.future.set_exception(cancelled)
        except JobError as error:  # the model cannot honour a field (e.g. >50 steps on the lcm schedule): a 400
            outcome = f"rejected ({error.param}: {error.message})"
            task.future.set_exception(error)
        except Exception as error:  # handed to the requester, which maps it to an HTTP status
            task.future.set_exception(error)
            log.exception("task %d failed", task.id)
        log.info(
            "job %d %s model=%s size=%dx%d n=%d steps=%d/%s sampler=%s engine=%s seconds=%.2f",
            task.id, outcome, job.model, job.width, job.height, job.n, task.steps_done, task.total_steps,
            job.sample_method, engine, time.monotonic() - started,
        )

    @staticmethod
    def _denoise(task: Task, pipeline: Any) -> list[Image.Image]:
        """Drive the pipeline's step generator, stopping between steps when the task is cancelled."""

        def on_step(step: Step) -> None:
            task.steps_done = step.index + 1
            if task.cancelled:
                raise JobCancelled()

        if task.cancelled:
            raise JobCancelled()
        return drive(pipeline.generate(task.job), on_step)
