"""The worker: one thread owns the engine and runs jobs one at a time from a bounded queue.

MLX work is not shared between threads, and one image server saturates the GPU with a single job,
so a queue in front of one thread is both the simplest and the fastest arrangement. A task can be
cancelled at any time; the worker notices between denoising steps and delivers nothing.

Every task has an id (the client's `X-Request-Id`, else a generated one): `tasks()` lists the queued and
running ones, `describe(id)` gives one's state (also for the last FINISHED_KEPT finished ones), and
`cancel_task(id)` stops it whether queued or running, answering its requester with TaskCancelled.

A task may be several jobs run one after the other on one loaded model (A1111's `n_iter` batches); a running
task can be stopped early with what it has (`Task.interrupt`: the current job's latest denoised estimate
decoded, later jobs not run; `Task.skip`: the same for the current job only) and asked for a preview of its
current step (`Task.request_preview`), made here on the worker thread. A task may instead be a plain call
(`submit_work`: an upscale), queued and limited like a job.

Between jobs (and every IDLE_POLL_SECONDS while idle) the thread runs the calls handed to `call` (loading and
unloading models: MLX work stays on this thread) and unloads models whose keep-alive has ended.

Stopping (`shutdown`, on SIGTERM) answers every waiting task at once with ServerStopping (HTTP 503), lets
the running job finish its current step and ends the thread; `stop` does that and waits for the thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import math
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from PIL import Image

from mlx_sd_server.engine.pipeline import drive
from mlx_sd_server.engine.sampling.samplers import Step
from mlx_sd_server.job import Job, JobError

log = logging.getLogger("mlx_sd_server.worker")


class QueueFullError(RuntimeError):
    """More jobs are waiting than the server accepts (HTTP 429). `retry_after`: seconds until the jobs
    ahead are likely done (the `Retry-After` header), measured from recent jobs."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class JobCancelled(Exception):
    """The task was cancelled (its client went away) before it finished."""


class TaskCancelled(JobCancelled):
    """The task was cancelled through the tasks API (DELETE /v1/images/tasks/{id}): its requester gets a 409."""

    def __init__(self, task_id: str):
        super().__init__(
            f"task {task_id} was cancelled (DELETE /v1/images/tasks/{task_id}) before it finished; nothing was kept"
        )
        self.task_id = task_id


# A client-chosen task id (X-Request-Id): short, and safe in a url path, a header and a log line.
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:-]{0,63}")


def valid_task_id(value: str) -> bool:
    return TASK_ID_PATTERN.fullmatch(value) is not None


def new_task_id() -> str:
    return "task_" + secrets.token_hex(8)


class ServerStopping(RuntimeError):
    """The server is shutting down: the job was not run, or not finished (HTTP 503)."""

    def __init__(
        self,
        message: str = "the server is shutting down: this job was not finished; send it again once the server is back",
    ):
        super().__init__(message)


class _StopEarly(Exception):
    """Raised between steps to end the current job with what it has (interrupt, skip)."""


class Task:
    """A submitted job (or jobs, run in order; or `work`, a call): its progress, its result (a concurrent
    Future) and a way to cancel it.

    `on_step(step, pipeline)`, when given, runs on the worker thread after each denoising step (partial
    images for streaming); it may raise to fail the job."""

    def __init__(
        self,
        job: Job | Sequence[Job],
        finish: Callable[[list[Image.Image]], Any] | None,
        task_id: str | None = None,
        on_step: Callable[[Step, Any], None] | None = None,
        work: Callable[[], Any] | None = None,
    ):
        self.id = task_id or new_task_id()
        self.jobs: tuple[Job, ...] = tuple(job) if isinstance(job, (list, tuple)) else (cast(Job, job),)
        self.job = self.jobs[0]
        self.finish = finish
        self.on_step = on_step
        self.work = work
        self.what = ""  # a work task's description, for the log
        self.step_totals: list[int] = []  # each job's steps, once its model is loaded
        # Stopping early, as A1111's interrupt and skip: the current job ends after its current step with its
        # latest estimate decoded; `interrupted` also drops the jobs after it.
        self.interrupted = False
        self.skip_requested = False
        # A preview of the current step, made when asked (request_preview) at most every PREVIEW_EVERY steps
        self.preview: Image.Image | None = None
        self.preview_step: int | None = None
        self.preview_wanted = False
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.steps_done = 0
        self.total_steps: int | None = None
        self.created_at = time.time()
        self.started: float | None = None  # time.monotonic() when the worker took it
        self.started_at: float | None = None  # the same, as wall-clock time
        self.ready: float | None = None  # time.monotonic() when its model was loaded (loading is no step)
        self.first_step_at: float | None = None  # time.monotonic() of the first and the latest finished step
        self.last_step_at: float | None = None
        self.finished_at: float | None = None
        self.state = "queued"  # -> running -> done | cancelled | failed
        self.error: str | None = None  # a failed task's message
        self.aborted: Exception | None = None  # the error its requester got when the server stopped it
        self._cancelled = threading.Event()

    def interrupt(self) -> None:
        """Stop after the current step and answer with what there is (the current step decoded)."""
        self.interrupted = True

    def skip(self) -> None:
        """End the current job after its current step (decoded, as interrupt does); the next job runs."""
        self.skip_requested = True

    def request_preview(self) -> None:
        """Ask for `preview`: the current step's first image, decoded on the worker thread after a step."""
        self.preview_wanted = True

    def cancel(self) -> None:
        self._cancelled.set()
        self.future.cancel()  # only takes effect while still queued; a running task checks the event

    def abort(self, error: Exception) -> None:
        """Answer the requester now with `error`; a running job stops after its current step."""
        self.aborted = error
        self._cancelled.set()
        _settle(self.future, error=error)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def progress(self) -> dict:
        return {
            "task": self.id,
            "model": None if self.work else self.job.model,
            "steps_done": self.steps_done,
            "total_steps": self.total_steps,
        }

    def seconds_per_step(self) -> float | None:
        """Measured: between the first and the latest step, else from the model being ready (or the start)
        to the first step."""
        if self.last_step_at is None or not self.steps_done:
            return None
        if self.steps_done >= 2 and self.first_step_at is not None and self.last_step_at > self.first_step_at:
            return (self.last_step_at - self.first_step_at) / (self.steps_done - 1)
        return (self.last_step_at - (self.ready or self.started or self.last_step_at)) / self.steps_done

    def describe(self, position: int | None = None) -> dict:
        """The task's state for GET /v1/images/tasks/{id}."""
        job = self.job
        info: dict[str, Any] = {
            "id": self.id,
            "object": "image.task",
            "state": self.state,
            "model": None if self.work else job.model,
            "created_at": int(self.created_at),
            "n": 1 if self.work else sum(j.n for j in self.jobs),
            "size": None if self.work else f"{job.width}x{job.height}",
            "step": self.steps_done,
            "total_steps": self.total_steps,
            "started_at": int(self.started_at) if self.started_at is not None else None,
            "finished_at": int(self.finished_at) if self.finished_at is not None else None,
        }
        if self.state == "queued":
            info["position"] = position
        if self.state == "running":
            per_step = self.seconds_per_step()
            remaining = (self.total_steps or 0) - self.steps_done
            info["seconds_per_step"] = round(per_step, 3) if per_step is not None else None
            info["eta_seconds"] = round(max(remaining, 0) * per_step, 1) if per_step is not None else None
        if self.state == "failed":
            info["error"] = self.error
        return info


class Worker:
    """Runs `registry.pipeline(job.model).generate(job)` for each submitted job, in submission order."""

    RECENT_JOBS = 20  # the Retry-After estimate is the mean duration of this many recent jobs
    # Retry-After before anything is measured (see estimated_wait): a job whose time is unknown counts
    # FIRST_GUESS_SECONDS, and all such guesses together at most FIRST_GUESS_CAP.
    FIRST_GUESS_SECONDS = 1.0
    FIRST_GUESS_CAP = 5.0
    MAX_RETRY_AFTER = 600  # seconds: the most Retry-After ever says, however long the jobs ahead take
    FINISHED_KEPT = 100  # finished tasks whose state GET /v1/images/tasks/{id} still answers
    IDLE_POLL_SECONDS = 0.25  # how often an idle worker runs calls and unloads models whose keep-alive ended
    PREVIEW_EVERY = 5  # steps between previews at most (a preview is a VAE decode: it costs about a step)

    def __init__(self, registry: Any, max_queue: int = 8):
        self.registry = registry
        self.max_queue = max_queue
        self._queue: queue.Queue[Task | None] = queue.Queue(maxsize=max_queue)
        self._running: Task | None = None
        self._stopping = False
        self._lock = threading.Lock()  # _running and _stopping, between the worker thread and the rest
        self._durations: collections.deque[float] = collections.deque(maxlen=self.RECENT_JOBS)
        self._live: dict[str, Task] = {}  # queued and running tasks, in submission order (under _lock)
        self._finished: collections.OrderedDict[str, dict] = collections.OrderedDict()  # id -> describe()
        # Calls to run on this thread between jobs (loading and unloading models), with their futures
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="mlx-sd-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def shutdown(self) -> None:
        """Stop taking jobs and answer every waiting one with ServerStopping now; the running job stops
        after its current step. Returns at once (callable from any thread, more than once)."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
            running = self._running
        aborted = []
        while True:
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task.abort(ServerStopping())
                with self._lock:
                    self._retire(task, "cancelled")
                aborted.append(task.id)
        if running is not None and not running.cancelled:
            running.abort(ServerStopping())
        while True:  # calls not yet run (model loads and unloads) are answered too
            try:
                _, future = self._calls.get_nowait()
            except queue.Empty:
                break
            _settle(future, error=ServerStopping("the server is shutting down"))
        if first and (running is not None or aborted):
            log.info(
                "stopping: %s; %d waiting job(s) answered that the server is shutting down",
                f"job {running.id} ends after its current step" if running is not None else "no job running",
                len(aborted),
            )
        # Wakes the thread, which then ends (again: the drain above may take one). Never full: submit refuses
        # new tasks once stopping.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    def stop(self, timeout: float | None = None) -> None:
        """shutdown(), then wait for the thread to finish its current step (at most `timeout` seconds)."""
        self.shutdown()
        if not self._thread.is_alive():
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the running step did not finish within %.0f s; exiting without waiting for it", timeout)

    def submit(
        self,
        job: Job | Sequence[Job],
        finish: Callable[[list[Image.Image]], Any] | None = None,
        task_id: str | None = None,
        on_step: Callable[[Step, Any], None] | None = None,
    ) -> Task:
        """Queue a job, or several (run in order on one loaded model; `finish` gets all their images). `finish`
        runs on the worker thread with the images (e.g. to encode them), and its return value becomes the
        task's result; `on_step` see Task. `task_id`: the client's choice (already checked by valid_task_id),
        refused with a 400 while a live task has it. Raises QueueFullError when the queue is full and
        ServerStopping once the server is shutting down."""
        return self._enqueue(Task(job, finish, task_id, on_step))

    def submit_work(self, work: Callable[[], Any], job: Job, what: str, task_id: str | None = None) -> Task:
        """Queue a call that is no generation (an upscale) as a task: run on the worker thread in its turn,
        within the queue's limit, its result the task's. `job` describes it in the task list (its output
        size), `what` in the log."""
        task = Task(job, None, task_id, work=work)
        task.what = what
        return self._enqueue(task)

    def running(self) -> Task | None:
        """The task running now, if any."""
        return self._running

    def _enqueue(self, task: Task) -> Task:
        if self._stopping:
            raise ServerStopping("the server is shutting down: send the job again once it is back")
        with self._lock:
            self._prune()
            if task.id in self._live:
                raise JobError(
                    f"X-Request-Id {task.id} is already the id of a queued or running task; choose another",
                    "X-Request-Id",
                    "duplicate_request_id",
                )
            try:
                self._queue.put_nowait(task)
            except queue.Full:
                retry_after = self.estimated_wait()
                raise QueueFullError(
                    f"{self.max_queue} jobs are already waiting; try again in about {retry_after} s",
                    retry_after=retry_after,
                ) from None
            self._live[task.id] = task
        if self._stopping:  # shutdown() drained the queue between the check above and the put
            task.abort(ServerStopping())
            with self._lock:
                self._retire(task, "cancelled")
        return task

    # --- tasks -------------------------------------------------------------------------------------

    def _prune(self) -> None:
        """(Under _lock.) Queued tasks whose requester went away (task.cancel()) leave the live list now,
        not when the worker reaches them."""
        for task in [t for t in self._live.values() if t.state == "queued" and t.future.done()]:
            self._retire(task, "cancelled")

    def _retire(self, task: Task, state: str) -> None:
        """(Under _lock, or on the worker thread.) The task is finished: keep its description only."""
        if task.finished_at is None or state != task.state:
            task.state = state
            task.finished_at = time.time()
        self._live.pop(task.id, None)
        self._finished[task.id] = task.describe()
        self._finished.move_to_end(task.id)
        while len(self._finished) > self.FINISHED_KEPT:
            self._finished.popitem(last=False)

    def tasks(self) -> list[dict]:
        """The queued and running tasks, running first, then in queue order."""
        with self._lock:
            self._prune()
            live = [task for task in self._live.values() if task.state in ("queued", "running")]
        running = [task.describe() for task in live if task.state == "running"]
        queued = [task for task in live if task.state == "queued"]
        return running + [task.describe(position) for position, task in enumerate(queued, 1)]

    def _lookup(self, task_id: str) -> tuple[Task | None, dict | None]:
        """(the live task, None) or (None, a finished one's description, or None when unknown); with the lock."""
        self._prune()
        task = self._live.get(task_id)
        finished = self._finished.get(task_id) if task is None else None
        return task, dict(finished) if finished is not None else None

    def describe(self, task_id: str) -> dict | None:
        """One task's state, live or among the last FINISHED_KEPT finished; None when unknown."""
        with self._lock:
            task, finished = self._lookup(task_id)
            if task is None:
                return finished
            position = None
            if task.state == "queued":
                queued = [t for t in self._live.values() if t.state == "queued"]
                position = queued.index(task) + 1
        return task.describe(position)

    def cancel_task(self, task_id: str) -> dict | None:
        """Cancel a queued or running task: its requester is answered TaskCancelled now; a running job
        stops after its current step. Returns its description (None: unknown id); a task that already
        finished is left as it is (its state says how it ended)."""
        with self._lock:
            task, finished = self._lookup(task_id)
            if task is None:
                return finished
            was = task.state
            task.abort(TaskCancelled(task.id))
            self._retire(task, "cancelled")
        log.info("task %s cancelled through the API while %s", task.id, was)
        return task.describe()

    def estimated_wait(self) -> int:
        """Whole seconds until the jobs now running and waiting are likely done (a 429's Retry-After).

        The rule: only what this server measured counts at face value, a guess stays small, and the
        whole is capped.
        - The running job: its remaining steps times its measured step time; else (nothing per step to
          read) its elapsed time scaled by its progress; else the mean of recent jobs less its elapsed time.
        - Each waiting job: the mean duration of the last RECENT_JOBS jobs (timed from their model being
          ready: loading a model once is no job's duration); else the running job's expected duration
          (its step time times its steps).
        - A job with nothing measured to go by (a fresh server whose first job has not finished a step)
          counts FIRST_GUESS_SECONDS, and such guesses add up to at most FIRST_GUESS_CAP: a client told
          too little asks again and gets a measured answer; one told too much waits for nothing (it was
          90 s, 10 s per job, for a queue that emptied in 0.66 s).
        - At most MAX_RETRY_AFTER in all."""
        durations = list(self._durations)
        mean = sum(durations) / len(durations) if durations else None
        running = self._running
        measured = guessed = 0.0
        expected = None  # the running job's whole duration, when it can be told
        if running is not None and running.started is not None:
            elapsed = time.monotonic() - (getattr(running, "ready", None) or running.started)
            per_step = running.seconds_per_step() if hasattr(running, "seconds_per_step") else None
            if per_step is not None and running.total_steps:
                expected = per_step * running.total_steps
                measured += max(running.total_steps - running.steps_done, 0) * per_step
            elif running.steps_done and running.total_steps:
                expected = elapsed * running.total_steps / running.steps_done
                measured += max(expected - elapsed, 0.0)
            elif mean is not None:
                measured += max(mean - elapsed, 0.0)
            else:
                guessed += self.FIRST_GUESS_SECONDS
        each = mean if mean is not None else expected
        waiting = self._queue.qsize()
        if each is not None:
            measured += waiting * each
        else:
            guessed += waiting * self.FIRST_GUESS_SECONDS
        seconds = measured + min(guessed, self.FIRST_GUESS_CAP)
        return min(max(1, math.ceil(seconds)), self.MAX_RETRY_AFTER)

    def status(self) -> dict:
        running = self._running
        return {
            "waiting": self._queue.qsize(),
            "max_waiting": self.max_queue,
            "running": running.progress() if running is not None else None,
        }

    def call(self, function: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `function` on the worker thread between jobs (at once when idle); its result in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopping:
            future.set_exception(ServerStopping("the server is shutting down"))
        else:
            self._calls.put((function, future))
        return future

    def _between_jobs(self) -> None:
        """The calls waiting, then the models whose keep-alive has ended are unloaded."""
        while True:
            try:
                function, future = self._calls.get_nowait()
            except queue.Empty:
                break
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function())
                except Exception as error:  # handed to the caller
                    future.set_exception(error)
        expire = getattr(self.registry, "expire", None)
        if expire is not None:
            try:
                expire()
            except Exception:
                log.exception("unloading idle models failed")

    def _next(self) -> Task | None:
        """The next job, running calls and unloading idle models while none is waiting."""
        while True:
            self._between_jobs()
            try:
                return self._queue.get(timeout=self.IDLE_POLL_SECONDS)
            except queue.Empty:
                continue

    def _loop(self) -> None:
        while (task := self._next()) is not None:
            if task.future.done() or not task.future.set_running_or_notify_cancel():
                log.info("task %s cancelled while queued", task.id)
                with self._lock:
                    if task.state == "queued":
                        self._retire(task, "cancelled")
                continue
            with self._lock:
                if self._stopping:  # taken from the queue just as shutdown() drained it
                    task.abort(ServerStopping())
                    self._retire(task, "cancelled")
                    continue
                self._running = task
                task.state = "running"
            try:
                self._run(task)
            finally:
                with self._lock:
                    self._running = None

    def _run(self, task: Task) -> None:
        job = task.job
        started = task.started = time.monotonic()
        task.started_at = time.time()
        engine = "?"
        outcome = "failed"
        try:
            if task.work is not None:
                task.ready = started
                engine = "call"
                result = task.work()
            else:
                pipeline = self.registry.acquire(job)
                try:
                    task.ready = time.monotonic()  # a model loaded for this job: no part of its duration
                    engine = type(pipeline).__name__  # DiffusionPipeline (MLX) or TorchPipeline
                    task.step_totals = [pipeline.total_steps(each) for each in task.jobs]
                    task.total_steps = sum(task.step_totals)
                    images: list[Image.Image] = []
                    for index, each in enumerate(task.jobs):
                        if task.interrupted:
                            break
                        images += self._denoise(task, pipeline, each, sum(task.step_totals[:index]))
                    result = task.finish(images) if task.finish else images
                finally:
                    del pipeline  # (released with keep_alive 0, a model's memory goes back only once nothing holds it)
                    self.registry.release(job)
            if task.cancelled:
                raise JobCancelled()
            _settle(task.future, result=result)
            outcome = "interrupted" if task.interrupted else "done"
            if task.work is None:  # (Retry-After's estimate is of jobs)
                self._durations.append(time.monotonic() - (task.ready or started))
        except JobCancelled as cancelled:
            outcome = "stopped (server shutting down)" if isinstance(task.aborted, ServerStopping) else "cancelled"
            _settle(task.future, error=cancelled)  # no-op when abort() already answered
        except JobError as error:  # the model cannot honour a field (e.g. >50 steps on the lcm schedule): a 400
            outcome = f"rejected ({error.param}: {error.message})"
            _settle(task.future, error=error)
        except Exception as error:  # handed to the requester, which maps it to an HTTP status
            _settle(task.future, error=error)
            log.exception("task %s failed", task.id)
            task.error = "internal error (details are in the server log)"
        with self._lock:
            if outcome in ("done", "interrupted"):
                state = "done"
            elif task.cancelled and not outcome.startswith("rejected"):
                state = "cancelled"
            else:
                state = "failed"
                if outcome.startswith("rejected"):
                    task.error = outcome
            self._retire(task, state)
        if task.work is not None:
            log.info("task %s %s: %s seconds=%.2f", task.id, outcome, task.what, time.monotonic() - started)
            return
        log.info(
            "job %s %s model=%s size=%dx%d n=%d steps=%d/%s sampler=%s engine=%s seconds=%.2f",
            task.id,
            outcome,
            job.model,
            job.width,
            job.height,
            sum(each.n for each in task.jobs),
            task.steps_done,
            task.total_steps,
            job.sample_method,
            engine,
            time.monotonic() - started,
        )

    @classmethod
    def _denoise(cls, task: Task, pipeline: Any, job: Job, offset: int = 0) -> list[Image.Image]:
        """Drive the pipeline's step generator for one of the task's jobs (its steps counted on from
        `offset`), stopping between steps when the task is cancelled, or early with the latest step
        decoded when it is interrupted or skipped (where the pipeline can decode latents)."""
        decode = getattr(pipeline, "decode_latents", None)
        last: list[Step] = []

        def on_step(step: Step) -> None:
            now = time.monotonic()
            if task.first_step_at is None:
                task.first_step_at = now
            task.last_step_at = now
            task.steps_done = offset + step.index + 1
            if task.cancelled:
                raise JobCancelled()
            last[:] = [step]
            if task.on_step is not None:
                task.on_step(step, pipeline)
            if decode is None:
                return
            since = None if task.preview_step is None else task.steps_done - task.preview_step
            if task.preview_wanted and (since is None or since >= cls.PREVIEW_EVERY):
                latents = step.denoised if step.denoised is not None else step.x
                task.preview, task.preview_step, task.preview_wanted = decode(latents[:1])[0], task.steps_done, False
            if task.interrupted or task.skip_requested:
                raise _StopEarly()

        if task.cancelled:
            raise JobCancelled()
        try:
            return drive(pipeline.generate(job), on_step)
        except _StopEarly:
            task.skip_requested = False
            step = last[0]
            assert decode is not None  # (only raised where the pipeline decodes)
            return decode(step.denoised if step.denoised is not None else step.x)


def _settle(future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it already has one (shutdown may answer a task before it ends)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
