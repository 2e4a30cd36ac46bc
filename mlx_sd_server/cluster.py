"""Several replicas behind one address with Ray Serve: `mlx-sd-server serve --ray`, or `serve run
mlx_sd_server.cluster:app model=NAME replicas=2` (an application builder; see docs/cluster.md).

The pieces:
- `Ingress`, Ray Serve's ingress deployment: our Quart app (`create_app`) served as an ASGI app, with a
  `RemoteWorker` in place of the local `Worker`. Parsing, validation, result encoding (`finish`), the store
  and the responses all stay in the ingress, as in the plain server; only the denoising moves.
- `ModelReplica`, one deployment per model: owns a ModelRegistry and a local Worker for its one model (loaded
  at start), runs a job and streams back what the ingress needs: the step total, partial images (decoded at
  the steps the ingress asks for) and the final images (PIL, pickled).
- `TaskBoard`, a named detached actor every replica reads and writes: each task's state (as
  GET /v1/images/tasks/{id} shows it, plus the replica that runs it), its cancel flag, which steps to
  decode for a streamed request. An actor rather than the store: task state changes every step (a
  progress write per task ten times a second), must be read-your-writes across replicas (a DELETE on one
  ingress must reach the job on another within a step) and is worth nothing once the cluster is gone;
  an object store (S3) is neither that fast nor that consistent, and would keep garbage. The actor is one
  process, so its updates are serialised without locks; it restarts empty if its node dies (task states
  are lost, jobs are not).

Backpressure: each model deployment has `max_ongoing_requests` (jobs a replica holds: one running, one
ready to start) and `max_queued_requests` (jobs waiting per ingress replica, --max-queue); beyond that Ray
raises BackPressureError, answered as our 429 with Retry-After (the recent mean job time times the jobs
waiting per replica).

Faults: a model replica that dies mid-job (killed, out of memory, its node gone) fails its request with a
503 `replica_died` in OpenAI's envelope ("send it again"): the job is not retried elsewhere, since it may
have been the job that killed it and the client decides whether it is worth the time. Nothing half-written
is kept: images are saved by the ingress after the job returns, all-or-nothing. Ray Serve's controller
replaces the dead replica (health checks), and the next request is served.

Not on the Ray path: loading/unloading models on demand (each model replica loads its model at start;
POST /v1/models/{id}/load answers 501), and upscales (POST /v1/upscale...) run in the ingress replica.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from mlx_sd_server.engine.sampling.samplers import Step
from mlx_sd_server.job import Job, JobError
from mlx_sd_server.worker import QueueFullError, TaskCancelled, Worker, new_task_id

log = logging.getLogger("mlx_sd_server.cluster")

BOARD_NAMESPACE = "mlx_sd_server"
DEFAULT_APP_NAME = "mlx-sd-server"
POLL_SECONDS = 0.1  # how often a model replica reports progress and reads the cancel flag
MARKS_WAIT_SECONDS = 10.0  # how long a replica waits for a streamed request's partial-image steps
BOARD_TIMEOUT_SECONDS = 10.0  # a call to the task board from a synchronous route
REPLICA_HEADER = "X-Ingress-Replica"  # which ingress replica answered (responses from the Ray path)


class ReplicasBusy(QueueFullError, JobError):
    """Ray refused the job: every replica of the model is busy and max_queued_requests are waiting (a 429
    with Retry-After; a JobError too, so that a streamed request's error event says 429)."""

    def __init__(self, message: str, retry_after: int):
        QueueFullError.__init__(self, message, retry_after)
        self.message, self.param, self.code, self.status = message, None, "queue_full", 429


class ReplicaDied(JobError):
    """The model replica running the job died before it finished (a 503: send it again)."""

    def __init__(self, model: str):
        super().__init__(
            f"the replica of {model} running this job died before it finished; nothing was kept. Send it again: "
            "the deployment starts a new replica",
            None,
            "replica_died",
            503,
        )


def deployment_name(model: str) -> str:
    """A model's deployment: `model-` and its name with anything but letters, digits and ._- as _."""
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model)


# --- the task board --------------------------------------------------------------------------------


class TaskBoard:
    """Every task of the Ray path, seen by every replica (a named detached actor; see the module docstring)."""

    FINISHED_KEPT = 1000

    def __init__(self) -> None:
        self.live: dict[str, dict] = {}  # queued and running, in submission order
        self.finished: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.cancelled: set[str] = set()
        self.marks: dict[str, list[int]] = {}

    def add(self, task_id: str, info: dict) -> bool:
        """A new task (queued); False when a live one has this id."""
        if task_id in self.live:
            return False
        self.finished.pop(task_id, None)
        self.cancelled.discard(task_id)
        self.live[task_id] = info
        return True

    def progress(self, task_id: str, info: dict) -> bool:
        """A model replica's report; True: the task was cancelled (stop it)."""
        if task_id in self.cancelled:
            return True
        if task_id in self.live:
            self.live[task_id].update(info)
        return False

    def finish(self, task_id: str, info: dict) -> None:
        """The task ended (info has its state); a cancelled one stays cancelled."""
        entry = self.live.pop(task_id, None)
        self.marks.pop(task_id, None)
        if entry is None:
            return  # already ended (cancelled, or finished by the ingress after its replica died)
        entry.update(info)
        entry.setdefault("finished_at", int(time.time()))
        self.finished[task_id] = entry
        while len(self.finished) > self.FINISHED_KEPT:
            gone, _ = self.finished.popitem(last=False)
            self.cancelled.discard(gone)

    def cancel(self, task_id: str) -> dict | None:
        """Cancel a live task (its replica stops it within a step); a finished one as it ended; None: unknown."""
        if task_id not in self.live:
            return self.get(task_id)
        self.cancelled.add(task_id)
        self.finish(task_id, {"state": "cancelled", "finished_at": int(time.time())})
        return self.get(task_id)

    def get(self, task_id: str) -> dict | None:
        if task_id in self.live:
            return self._shown(task_id, self.live[task_id])
        entry = self.finished.get(task_id)
        return dict(entry) if entry is not None else None

    def tasks(self) -> list[dict]:
        """The live tasks, running first, then queued in submission order."""
        running = [dict(e) for e in self.live.values() if e["state"] == "running"]
        queued = [self._shown(i, e) for i, e in self.live.items() if e["state"] == "queued"]
        return running + queued

    def _shown(self, task_id: str, entry: dict) -> dict:
        shown = dict(entry)
        if entry["state"] == "queued":
            queued = [i for i, e in self.live.items() if e["state"] == "queued"]
            shown["position"] = queued.index(task_id) + 1
        return shown

    def set_marks(self, task_id: str, marks: list[int]) -> None:
        self.marks[task_id] = marks

    def get_marks(self, task_id: str) -> list[int] | None:
        return self.marks.get(task_id)


def task_board(app_name: str = DEFAULT_APP_NAME) -> Any:
    """The app's task board: found, or made (named, detached, restarted if its node dies, no CPU)."""
    import ray

    return (
        ray.remote(TaskBoard)
        .options(
            name=f"tasks:{app_name}",
            namespace=BOARD_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
        )
        .remote()
    )


# --- the model deployment --------------------------------------------------------------------------


class ModelReplica:
    """One replica of one model's deployment: its own registry and worker, the model loaded at start."""

    def __init__(self, make_registry: Callable[[], Any], model: str, app_name: str = DEFAULT_APP_NAME):
        from ray import serve

        self.registry = make_registry()
        self.model = model
        self.worker = Worker(self.registry, max_queue=8)  # never full: Ray sends at most max_ongoing_requests
        self.worker.start()
        self.worker.call(lambda: self.registry.load(model)).result()  # loaded on the worker thread, as always
        self.board = task_board(app_name)
        replica_id = serve.get_replica_context().replica_id
        self.replica = replica_id.unique_id
        self.actor_name = replica_id.to_full_id_str()  # the replica actor's name (namespace "serve")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.worker.stop(timeout=5)

    async def run(self, jobs: Job | Sequence[Job], task_id: str, partials: bool):
        """Run the task; yields ("total", steps), ("partial", step index, images) at the steps the board's
        marks name (when `partials`), then ("done", images). Errors raise (Ray hands them to the caller)."""
        import ray

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        marks: list[int] | None = None
        job_list = list(jobs) if isinstance(jobs, (list, tuple)) else [jobs]

        def post(item: tuple) -> None:  # from the worker thread
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, item)

        def on_step(step: Step, pipeline: Any) -> None:  # the worker thread
            nonlocal marks
            if marks is None:
                post(("total", sum(pipeline.total_steps(each) for each in job_list)))
                marks = []
                deadline = time.monotonic() + MARKS_WAIT_SECONDS
                while partials and time.monotonic() < deadline:
                    found = ray.get(self.board.get_marks.remote(task_id))
                    if found is not None:
                        marks = found
                        break
                    time.sleep(0.01)
            if step.index + 1 in marks and step.denoised is not None and hasattr(pipeline, "decode_latents"):
                post(("partial", step.index, pipeline.decode_latents(step.denoised)))

        task = self.worker.submit(jobs, None, task_id=task_id, on_step=on_step)
        done = asyncio.wrap_future(task.future)
        try:
            while True:
                while not events.empty():
                    yield events.get_nowait()
                if done.done():
                    break
                await asyncio.wait([done], timeout=POLL_SECONDS)
                if done.done():
                    continue  # (its events, then the result: no report needed)
                found = self.worker.describe(task_id) or {}
                found = {key: value for key, value in found.items() if key != "id"}
                report = {**found, "replica": self.replica, "replica_actor": self.actor_name}
                if report.get("state") in ("done", "failed", "cancelled"):
                    report["state"] = "running"  # the board's state ends when the ingress has the result
                if await self.board.progress.remote(task_id, report):
                    self.worker.cancel_task(task_id)
            while not events.empty():
                yield events.get_nowait()
            images = done.result()  # raises the job's error
            yield ("done", images)
        finally:
            if not task.future.done():  # the caller went away: stop the job
                self.worker.cancel_task(task_id)

    def check_health(self) -> None:
        if self.worker.stopping:
            raise RuntimeError("the worker has stopped")


# --- the ingress's worker --------------------------------------------------------------------------


class _Probe(Exception):
    """Raised by _ProbePipeline.decode_latents: on_step asked for a decode at this step."""


class _ProbePipeline:
    def __init__(self, total: int):
        self.total = total

    def total_steps(self, job: Job) -> int:
        return self.total

    def decode_latents(self, latents: Any) -> list[Image.Image]:
        raise _Probe()


class _RelayPipeline(_ProbePipeline):
    """What on_step sees in the ingress: the replica's step total; a "decode" is the replica's images."""

    def decode_latents(self, latents: Any) -> list[Image.Image]:
        return latents


_DENOISED = object()  # a step's stand-in estimate while probing


def probe_marks(on_step: Callable[[Step, Any], None], total: int) -> list[int]:
    """The steps (counted from 1) at which `on_step` decodes latents (a streamed request's partial images):
    it is called for each step with a pipeline whose decode raises. (images.py's on_step decodes before it
    emits anything, so probing has no other effect.)"""
    pipeline = _ProbePipeline(total)
    marks = []
    for index in range(total):
        try:
            on_step(Step(index, 0.0, None, _DENOISED), pipeline)  # type: ignore[arg-type]
        except _Probe:
            marks.append(index + 1)
    return marks


class RemoteTask:
    """What api/* hold of a submitted task on the Ray path: its id, its future and cancel()."""

    def __init__(self, task_id: str, jobs: tuple[Job, ...]):
        self.id = task_id
        self.jobs = jobs
        self.job = jobs[0]
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.driver: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def cancel(self) -> None:
        """The requester went away: stop the call (Ray cancels it in the replica, which stops the job)."""
        self.future.cancel()
        if self.driver is not None and self.loop is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.driver.cancel)


class RemoteWorker:
    """`server.worker` in an ingress replica: jobs go to their model's deployment, task state to the board.
    Calls (model loads) are refused and work tasks (upscales) run on `local`, the ingress's own worker."""

    RECENT_JOBS = 20

    def __init__(self, handles: dict[str, Any], board: Any, local: Worker, max_queue: int, replicas: int):
        self.handles = handles
        self.board = board
        self.local = local
        self.max_queue = max_queue
        self.replicas = max(replicas, 1)
        self._durations: collections.deque[float] = collections.deque(maxlen=self.RECENT_JOBS)
        self._waiting = 0  # jobs this ingress sent that no replica has started yet

    # the Worker interface api/* use ------------------------------------------------------------------

    def start(self) -> None:
        self.local.start()

    def stop(self, timeout: float | None = None) -> None:
        self.local.stop(timeout)

    def shutdown(self) -> None:
        self.local.shutdown()

    @property
    def stopping(self) -> bool:
        return self.local.stopping

    def running(self) -> Any:
        return self.local.running()

    def submit_work(self, work: Callable[[], Any], job: Job, what: str, task_id: str | None = None) -> Any:
        return self.local.submit_work(work, job, what, task_id)

    def call(self, function: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_exception(
            JobError(
                "not on the Ray path: each model deployment loads its model when its replicas start",
                None,
                "not_supported",
                501,
            )
        )
        return future

    def submit(
        self,
        job: Job | Sequence[Job],
        finish: Callable[[list[Image.Image]], Any] | None = None,
        task_id: str | None = None,
        on_step: Callable[[Step, Any], None] | None = None,
    ) -> RemoteTask:
        """Send the task to its model's deployment (called on the event loop); its outcome in the future."""
        jobs = tuple(job) if isinstance(job, (list, tuple)) else (job,)
        task = RemoteTask(task_id or new_task_id(), jobs)
        task.loop = asyncio.get_running_loop()
        task.driver = task.loop.create_task(self._drive(task, finish, on_step))
        return task

    def tasks(self) -> list[dict]:
        return self._board(self.board.tasks) + self.local.tasks()

    def describe(self, task_id: str) -> dict | None:
        return self._board(self.board.get, task_id) or self.local.describe(task_id)

    def cancel_task(self, task_id: str) -> dict | None:
        found = self._board(self.board.cancel, task_id)
        return found if found is not None else self.local.cancel_task(task_id)

    def status(self) -> dict:
        live = self._board(self.board.tasks)
        running = [task for task in live if task["state"] == "running"]
        return {
            "waiting": len(live) - len(running),
            "max_waiting": self.max_queue,
            "running": {"task": running[0]["id"], "model": running[0]["model"], "steps_done": running[0]["step"],
                        "total_steps": running[0]["total_steps"]} if running else None,
        }  # fmt: skip

    def estimated_wait(self) -> int:
        """Seconds until a place is likely free: the recent mean job time (else Worker's first guess) times
        the jobs waiting per replica, plus one job."""
        mean = sum(self._durations) / len(self._durations) if self._durations else Worker.FIRST_GUESS_SECONDS
        seconds = mean * (1 + self._waiting / self.replicas)
        return min(max(1, math.ceil(seconds)), Worker.MAX_RETRY_AFTER)

    # ------------------------------------------------------------------------------------------------

    def _board(self, method: Any, *args: Any) -> Any:
        import ray

        return ray.get(method.remote(*args), timeout=BOARD_TIMEOUT_SECONDS)

    async def _drive(
        self,
        task: RemoteTask,
        finish: Callable[[list[Image.Image]], Any] | None,
        on_step: Callable[[Step, Any], None] | None,
    ) -> None:
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError

        job = task.job
        model = job.model or ""  # (the ingress resolved it: never empty here)
        info = {
            "id": task.id,
            "object": "image.task",
            "state": "queued",
            "model": job.model,
            "created_at": int(time.time()),
            "n": sum(each.n for each in task.jobs),
            "size": f"{job.width}x{job.height}",
            "step": 0,
            "total_steps": None,
            "started_at": None,
            "finished_at": None,
        }
        started = None
        waiting = True
        self._waiting += 1
        outcome: dict[str, Any] = {"state": "failed", "error": "internal error (details are in the server log)"}
        try:
            if not await self.board.add.remote(task.id, info):
                raise JobError(
                    f"X-Request-Id {task.id} is already the id of a queued or running task; choose another",
                    "X-Request-Id",
                    "duplicate_request_id",
                )
            handle = self.handles.get(model)
            if handle is None:
                raise JobError(f"no deployment serves {model} on this cluster", "model", "model_not_found", 404)
            stream = handle.options(stream=True).run.remote(
                list(task.jobs) if len(task.jobs) > 1 else job, task.id, on_step is not None
            )
            total = 0
            async for item in stream:
                if waiting:
                    waiting = False
                    self._waiting -= 1
                    started = time.monotonic()
                if item[0] == "total":
                    total = item[1]
                    if on_step is not None:
                        await self.board.set_marks.remote(task.id, probe_marks(on_step, total))
                elif item[0] == "partial" and on_step is not None:
                    _, index, images = item
                    step = Step(index, 0.0, None, images)  # type: ignore[arg-type]
                    await asyncio.to_thread(on_step, step, _RelayPipeline(total))
                elif item[0] == "done":
                    images = item[1]
                    result = await asyncio.to_thread(finish, images) if finish is not None else images
                    _settle(task.future, result=result)
                    outcome = {"state": "done"}
            if started is not None:
                self._durations.append(time.monotonic() - started)
        except asyncio.CancelledError:  # the requester went away (RemoteTask.cancel)
            outcome = {"state": "cancelled"}
            _settle(task.future, error=TaskCancelled(task.id))
        except BackPressureError:
            retry = self.estimated_wait()
            outcome = {"state": "failed", "error": "refused: every replica busy"}
            _settle(
                task.future,
                error=ReplicasBusy(
                    f"every replica of {model} is busy and {self.max_queue} jobs are already waiting; "
                    f"try again in about {retry} s",
                    retry,
                ),
            )
        except RayActorError:
            log.warning("task %s: the replica running it died", task.id)
            error = ReplicaDied(model)
            outcome = {"state": "failed", "error": error.message}
            _settle(task.future, error=error)
        except RayTaskError as wrapped:  # the job's own error, raised in the replica
            cause = wrapped.cause if isinstance(wrapped.cause, BaseException) else RuntimeError(str(wrapped))
            if isinstance(cause, TaskCancelled):
                outcome = {"state": "cancelled"}
            elif isinstance(cause, JobError):
                outcome = {"state": "failed", "error": f"rejected ({cause.param}: {cause.message})"}
            _settle(task.future, error=cause)
        except Exception as error:
            log.exception("task %s failed", task.id)
            _settle(task.future, error=error)
            if isinstance(error, JobError) and error.code == "duplicate_request_id":
                return
        finally:
            if waiting:
                self._waiting -= 1
        with contextlib.suppress(Exception):
            await self.board.finish.remote(task.id, {**outcome, "finished_at": int(time.time())})


def _settle(future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


# --- the ingress deployment ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """What every replica builds its part from (pickled to each): factories, not built objects."""

    make_registry: Callable[[], Any]
    make_store: Callable[[], Any]
    settings: Any  # api.Settings
    models: tuple[str, ...] = ()  # the deployed models' API names (default: all the registry serves)
    replicas: int = 1  # per model, unless autoscale
    autoscale: tuple[int, int] | None = None  # (min, max) replicas per model
    ingress_replicas: int = 1
    max_ongoing_requests: int = 2  # per model replica: one running, one ready to start
    ingress_max_ongoing_requests: int = 1000  # HTTP requests an ingress replica holds (each mostly waiting)
    replica_actor_options: dict = dataclasses.field(default_factory=lambda: {"num_cpus": 1})
    ingress_actor_options: dict = dataclasses.field(default_factory=lambda: {"num_cpus": 0})
    app_name: str = DEFAULT_APP_NAME


class Ingress:
    """The HTTP app (api.create_app) as Ray Serve's ingress, its worker a RemoteWorker."""

    def __init__(self, spec: ClusterSpec, handles: dict[str, Any]):
        from ray import serve

        from mlx_sd_server.api import create_app

        self.replica = serve.get_replica_context().replica_id.unique_id
        registry = spec.make_registry()
        self.asgi = create_app(registry, spec.make_store(), spec.settings)
        state = self.asgi.extensions["mlx_sd_server"]
        replicas = spec.autoscale[1] if spec.autoscale else spec.replicas
        # The app's own hooks start and stop state.worker's local worker (upscales run there).
        state.worker = RemoteWorker(handles, task_board(spec.app_name), state.worker, spec.settings.max_queue, replicas)

    async def __serve_build_asgi_app__(self) -> Any:
        return _Tagged(self.asgi, self.replica)


class _Tagged:
    """An ASGI app whose responses carry X-Ingress-Replica (which ingress replica answered). A class, not a
    partial: uvicorn (Ray's ASGI runner) tells ASGI 3 from 2 by the callable's signature."""

    def __init__(self, app: Any, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def tagged_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged_send if scope["type"] == "http" else send)


def build(spec: ClusterSpec) -> Any:
    """The Ray Serve application: one deployment per model and the ingress bound to their handles."""
    from ray import serve

    deployment: Any = serve.deployment  # (typed as a decorator factory; called on a class it is a Deployment)
    models = spec.models or tuple(spec.make_registry().names())
    bound = {}
    for model in models:
        options: dict[str, Any] = {
            "name": deployment_name(model),
            "max_ongoing_requests": spec.max_ongoing_requests,
            "max_queued_requests": spec.settings.max_queue,
            "ray_actor_options": spec.replica_actor_options,
            "health_check_period_s": 2,
        }
        if spec.autoscale:
            low, high = spec.autoscale
            options["autoscaling_config"] = {
                "min_replicas": low,
                "max_replicas": high,
                "target_ongoing_requests": 1,
            }
        else:
            options["num_replicas"] = spec.replicas
        bound[model] = deployment(ModelReplica).options(**options).bind(spec.make_registry, model, spec.app_name)
    ingress = deployment(serve.ingress()(Ingress)).options(
        name="ingress",
        num_replicas=spec.ingress_replicas,
        max_ongoing_requests=spec.ingress_max_ongoing_requests,
        ray_actor_options=spec.ingress_actor_options,
    )
    return ingress.bind(spec, bound)


# --- entry points ----------------------------------------------------------------------------------


def spec_from_args(args: argparse.Namespace, settings: Any) -> ClusterSpec:
    from mlx_sd_server.api.server import registry_from_args, store_from_args

    autoscale = None
    if getattr(args, "autoscale", None):
        low, _, high = args.autoscale.partition(":")
        autoscale = (int(low), int(high))
    return ClusterSpec(
        make_registry=functools.partial(registry_from_args, args),
        make_store=functools.partial(store_from_args, args),
        settings=settings,
        replicas=args.replicas,
        autoscale=autoscale,
        ingress_replicas=args.ingress_replicas,
        replica_actor_options={"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
    )


def serve_with_ray(args: argparse.Namespace) -> int:
    """`serve --ray`: start (or join, --ray-address) Ray, deploy, and serve on --host/--port through Ray
    Serve's HTTP proxy until interrupted."""
    import ray
    from ray import serve

    from mlx_sd_server.api.server import (
        bind_address,
        bind_socket,
        configure_logging,
        listening_settings,
        settings_from_args,
        warn_about_exposure,
    )

    configure_logging(args.log_level)
    host, port = bind_address(args)
    sock = bind_socket(host, port)  # a busy port is one line now, before Ray starts
    try:
        settings = listening_settings(settings_from_args(args), host, sock)
        warn_about_exposure(settings, sock)
    finally:
        sock.close()  # Ray's proxy binds it
    ray.init(address=args.ray_address, namespace=BOARD_NAMESPACE)
    serve.start(http_options={"host": host, "port": port})
    spec = spec_from_args(args, settings)
    serve.run(build(spec), name=spec.app_name, route_prefix="/", blocking=False)
    log.info("serving on %s through Ray Serve (Ctrl-C stops)", settings.bound_url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
        serve.delete(spec.app_name)
    return 0


def app(args: dict[str, str]) -> Any:
    """`serve run mlx_sd_server.cluster:app [model=NAME ...] [model_dir=DIR] [store_dir=DIR] [replicas=N]
    [autoscale=MIN:MAX] [ingress_replicas=N] [replica_gpus=N]`: the application, built from serve's
    options (any `serve` option as name=value, dashes as underscores; model may be repeated as model=A,B).
    Ray Serve's own --host/--port (or its config file's http_options) say where it listens."""
    from mlx_sd_server.api.server import settings_from_args
    from mlx_sd_server.cli import add_serve_options

    parser = argparse.ArgumentParser()
    add_serve_options(parser)
    argv: list[str] = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        for each in value.split(",") if name == "model" else [value]:
            argv += [flag] if value in ("true", "True") else [flag, each]
    parsed = parser.parse_args(argv)
    return build(spec_from_args(parsed, settings_from_args(parsed)))
