"""The Ray Serve path (mlx_sd_server/cluster.py) on a real local Ray cluster (loopback, 2 CPUs, no dashboard):
two ingress replicas and two replicas of the tiny model behind Ray's HTTP proxy; the store is a folder they
share. Marked `cluster` (not in the default run; .ci/run runs it as its own step)."""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import http.client
import json
import time

import pytest
import ray
from ray import serve

from mlx_sd_server.api import Settings
from mlx_sd_server.cluster import BOARD_NAMESPACE, REPLICA_HEADER, ClusterSpec, build, deployment_name
from mlx_sd_server.registry import TINY_MODEL_NAME, ModelRegistry
from mlx_sd_server.store import FileStore
from tests.api_server import free_port, request

pytestmark = pytest.mark.cluster

APP = "test-cluster"
SMALL = {"prompt": "a red apple", "size": "64x64", "steps": 4}
LONG = {"prompt": "a slow one", "size": "64x64", "steps": 150}  # ~5 s on one core: long enough to act on


def post(base: str, body: dict, headers: dict | None = None):
    return request(
        base,
        "POST",
        "/v1/images/generations",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", **(headers or {})},
    )


def header(reply, name: str) -> str:
    """A response header by name, in any case (Ray's proxy sends them lower case)."""
    return {key.lower(): value for key, value in reply.headers.items()}[name.lower()]


def wait_for(what, timeout: float = 60.0, every: float = 0.1):
    """`what()`'s first truthy value, polled; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    files = tmp_path_factory.mktemp("files")
    ModelRegistry([TINY_MODEL_NAME], models)  # builds the tiny model's folder once, before the replicas read it
    ray.init(num_cpus=2, include_dashboard=False, namespace=BOARD_NAMESPACE, log_to_driver=False)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    spec = ClusterSpec(
        make_registry=functools.partial(ModelRegistry, [TINY_MODEL_NAME], models),
        make_store=functools.partial(FileStore, files),
        settings=Settings(max_queue=4, bound_url=base),
        replicas=2,
        ingress_replicas=2,
        replica_actor_options={"num_cpus": 0.5},
        app_name=APP,
    )
    serve.run(build(spec), name=APP, route_prefix="/")
    try:
        yield base, files
    finally:
        serve.shutdown()
        ray.kill(ray.get_actor(f"tasks:{APP}", namespace=BOARD_NAMESPACE))
        ray.shutdown()


def task_of(base: str, task_id: str) -> dict:
    reply = request(base, "GET", f"/v1/images/tasks/{task_id}")
    assert reply.status == 200, reply.body
    return reply.json()


def test_fifty_concurrent_clients_all_answered_on_both_replicas(cluster):
    base, _ = cluster
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(lambda i: post(base, {**SMALL, "seed": i}, {"X-Request-Id": f"many-{i}"}), range(50)))
    statuses = [reply.status for reply in replies]
    assert set(statuses) <= {200, 429}, statuses
    refused = [reply for reply in replies if reply.status == 429]
    for reply in refused:
        assert int(header(reply, "Retry-After")) >= 1
        assert reply.json()["error"]["code"] == "queue_full"
    served = [reply for reply in replies if reply.status == 200]
    assert served and refused, statuses  # 50 at once is more than 2 replicas x 2 + 2 ingresses x 4 waiting
    replicas = set()
    for reply in served:
        body = reply.json()
        assert len(body["data"]) == 1
        url = body["data"][0]["url"]
        image = request(base, "GET", url.removeprefix(base))
        assert image.status == 200 and image.body[:8] == b"\x89PNG\r\n\x1a\n"
        found = task_of(base, body["task_id"])
        assert found["state"] == "done"
        replicas.add(found["replica"])
    assert len(replicas) == 2, replicas
    print(f"\n50 clients: {len(served)} served, {len(refused)} refused with 429; replicas {sorted(replicas)}")


def test_streamed_request_with_partial_images_passes_through(cluster):
    base, _ = cluster
    reply = post(base, {**SMALL, "steps": 6, "stream": True, "partial_images": 2, "response_format": "b64_json"})
    assert reply.status == 200 and header(reply, "Content-Type").startswith("text/event-stream")
    events = [block for block in reply.body.decode().split("\n\n") if block]
    names = [block.split("\n")[0].removeprefix("event: ") for block in events]
    assert names == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], names
    partials = [json.loads(block.split("\n")[1].removeprefix("data: ")) for block in events[:2]]
    assert [p["partial_image_index"] for p in partials] == [0, 1]
    assert all(base64.b64decode(p["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n" for p in partials)
    health = request(base, "GET", "/health")
    assert health.status == 200 and health.json()["queue"]["max_waiting"] == 4


def test_status_and_cancel_through_another_ingress_replica(cluster):
    base, _ = cluster
    host, port = base.removeprefix("http://").split(":")
    for attempt in range(8):  # Ray's proxy picks the ingress replica: until the DELETE lands on the other one
        task_id = f"cancel-{attempt}"
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request(
            "POST",
            "/v1/images/generations",
            json.dumps({**LONG, "stream": True}),
            {"Content-Type": "application/json", "X-Request-Id": task_id},
        )
        stream = conn.getresponse()
        assert stream.status == 200
        origin = stream.getheader(REPLICA_HEADER)

        def seen_running_elsewhere(task_id=task_id, origin=origin):
            reply = request(base, "GET", f"/v1/images/tasks/{task_id}")
            other = header(reply, REPLICA_HEADER) != origin
            return other and reply.json()["state"] == "running" and reply.json()["step"] > 0 and reply.json()

        found = wait_for(seen_running_elsewhere)
        assert found["model"] == TINY_MODEL_NAME and found["total_steps"] == 150 and found["replica"]
        cancel = request(base, "DELETE", f"/v1/images/tasks/{task_id}")
        assert cancel.status == 200 and cancel.json()["state"] == "cancelled"
        events = stream.read().decode()
        conn.close()
        assert "event: error" in events and '"code":"task_cancelled"' in events, events[-500:]
        assert task_of(base, task_id)["state"] == "cancelled"
        if header(cancel, REPLICA_HEADER) != origin:
            return
    pytest.fail("eight DELETEs all landed on the streaming request's own ingress replica")


def test_replica_killed_mid_job_is_a_503_and_the_deployment_heals(cluster):
    base, files = cluster
    before = sorted(path.name for path in files.rglob("*") if path.is_file())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, base, LONG, {"X-Request-Id": "doomed"})
        found = wait_for(lambda: (t := task_of_or_none(base, "doomed")) and t.get("step", 0) > 0 and t)
        ray.kill(ray.get_actor(found["replica_actor"], namespace="serve"))
        reply = pending.result(timeout=60)
    assert reply.status == 503, reply.body
    error = reply.json()["error"]
    assert error["code"] == "replica_died" and "send it again" in error["message"].lower()
    assert task_of(base, "doomed")["state"] == "failed"
    assert sorted(path.name for path in files.rglob("*") if path.is_file()) == before  # nothing half-written

    def healed():
        status = serve.status().applications[APP].deployments[deployment_name(TINY_MODEL_NAME)]
        return status.status == "HEALTHY" and status.replica_states.get("RUNNING") == 2

    wait_for(healed, timeout=120, every=0.5)
    assert wait_for(lambda: post(base, SMALL).status == 200, timeout=30)


def task_of_or_none(base: str, task_id: str) -> dict | None:
    reply = request(base, "GET", f"/v1/images/tasks/{task_id}")
    return reply.json() if reply.status == 200 else None
