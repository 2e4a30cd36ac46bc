"""The task API: every generation/edit is a task with an id (`X-Task-Id`, the body's `task_id`).

GET /v1/images/tasks lists the queued and running tasks; GET /v1/images/tasks/{id} gives one's state
(queued with its position, running with step/total and an ETA from its measured step times, or how it
ended: done, cancelled, failed; the last 100 finished are kept); DELETE /v1/images/tasks/{id} (or POST
/v1/images/tasks/{id}/cancel) cancels it, queued or running. The requester of a cancelled task gets a 409
`task_cancelled` in OpenAI's error envelope (as an SSE `error` event when it is streaming), and nothing is
kept. An unknown id is a 404; cancelling a task that already ended is a 409 `task_finished`.
"""

from __future__ import annotations

from quart import Blueprint, jsonify

from mlx_sd_server.api.errors import error_response
from mlx_sd_server.api.state import state
from mlx_sd_server.worker import TaskCancelled

blueprint = Blueprint("tasks", __name__)


def _not_found(task_id: str):
    return error_response(404, f"no task {task_id[:64]} is queued, running or among the recently finished", "id",
                          "task_not_found")


@blueprint.get("/v1/images/tasks")
async def list_tasks():
    return jsonify({"object": "list", "data": state().worker.tasks()})


@blueprint.get("/v1/images/tasks/<task_id>")
async def get_task(task_id: str):
    found = state().worker.describe(task_id)
    return jsonify(found) if found is not None else _not_found(task_id)


@blueprint.delete("/v1/images/tasks/<task_id>")
@blueprint.post("/v1/images/tasks/<task_id>/cancel")
async def cancel_task(task_id: str):
    found = state().worker.cancel_task(task_id)
    if found is None:
        return _not_found(task_id)
    if found["state"] != "cancelled":
        return error_response(409, f"task {task_id} already ended ({found['state']}): nothing to cancel", "id",
                              "task_finished")
    return jsonify(found)


@blueprint.app_errorhandler(TaskCancelled)
async def task_cancelled(error: TaskCancelled):
    return error_response(409, str(error), None, "task_cancelled")
