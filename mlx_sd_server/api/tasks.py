"""The task API: every generation/edit is a task with an id (`X-Task-Id`, the body's `task_id`).

GET /v1/images/tasks lists the queued and running tasks; GET /v1/images/tasks/{id} gives one's state
(queued with its position, running with step/total and an ETA from its measured step times, or how it
ended: done, cancelled, failed; the last 100 finished are kept); DELETE /v1/images/tasks/{id} (or POST
/v1/images/tasks/{id}/cancel) cancels it, queued or running. The requester of a cancelled task gets a 409
`task_cancelled` in OpenAI's error envelope (as an SSE `error` event when it is streaming), and nothing is
kept. An unknown id is a 404; cancelling a task that already ended is a 409 `task_finished`.
GET /v1/images/tasks/{id}/events follows one as Server-Sent Events, for UIs: a `progress` event (the task's
state, as GET gives it) whenever it changes, then one named by how it ended (`done`, `cancelled`, `failed`).
"""

from __future__ import annotations

import asyncio
import json

from quart import Blueprint, Response, jsonify

from mlx_sd_server.api.errors import error_response
from mlx_sd_server.api.state import state
from mlx_sd_server.worker import TaskCancelled

blueprint = Blueprint("tasks", __name__)


def _not_found(task_id: str):
    return error_response(
        404, f"no task {task_id[:64]} is queued, running or among the recently finished", "id", "task_not_found"
    )


@blueprint.get("/v1/images/tasks")
async def list_tasks():
    return jsonify({"object": "list", "data": state().worker.tasks()})


@blueprint.get("/v1/images/tasks/<task_id>")
async def get_task(task_id: str):
    found = state().worker.describe(task_id)
    return jsonify(found) if found is not None else _not_found(task_id)


ENDED = ("done", "cancelled", "failed")
POLL_SECONDS = 0.1  # how often the event stream looks at the task: well under a step of any model


@blueprint.get("/v1/images/tasks/<task_id>/events")
async def follow_task(task_id: str):
    worker = state().worker
    if worker.describe(task_id) is None:
        return _not_found(task_id)

    async def events():
        last = None
        while (found := worker.describe(task_id)) is not None:
            if found != last:
                name = found["state"] if found["state"] in ENDED else "progress"
                yield f"event: {name}\ndata: {json.dumps(found)}\n\n".encode()
                if name != "progress":
                    return
                last = found
            await asyncio.sleep(POLL_SECONDS)

    response = Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
    response.timeout = None  # as long as the task runs
    return response


@blueprint.delete("/v1/images/tasks/<task_id>")
@blueprint.post("/v1/images/tasks/<task_id>/cancel")
async def cancel_task(task_id: str):
    found = state().worker.cancel_task(task_id)
    if found is None:
        return _not_found(task_id)
    if found["state"] != "cancelled":
        return error_response(
            409, f"task {task_id} already ended ({found['state']}): nothing to cancel", "id", "task_finished"
        )
    return jsonify(found)


@blueprint.app_errorhandler(TaskCancelled)
async def task_cancelled(error: TaskCancelled):
    return error_response(409, str(error), None, "task_cancelled")
