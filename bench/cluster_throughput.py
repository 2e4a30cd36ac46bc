"""Ray Serve's path (mlx_sd_server/cluster.py) against the plain server: requests per minute with one and two
replicas of the tiny model, and the Ray path's overhead for one request.

    python bench/cluster_throughput.py [--size 128x128] [--steps 8] [--clients 4] [--seconds 60] [--runs 5]
    python bench/cluster_throughput.py --smoke      # 64x64, 2 steps, 10 s windows: a check that it runs

Serves the built-in tiny random-weight model three ways on real local sockets: the plain server (Hypercorn,
one worker), and Ray Serve (a local Ray cluster on loopback, one ingress replica) with one, then two, replicas
of the model. Throughput: --clients closed-loop clients POST /v1/images/generations (b64_json) for --seconds;
a 429 waits its Retry-After and counts nothing. Overhead: the median of --runs single requests, one at a time.
The script re-execs itself with OpenBLAS preloaded (Ray's workers inherit it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from common import load_average, median_seconds, print_table  # noqa: E402

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402


def throughput(url: str, body: bytes, clients: int, seconds: float) -> tuple[float, int]:
    """(requests per minute answered 200, 429s seen) with `clients` closed-loop clients for `seconds`."""
    from api_server import request

    deadline = time.monotonic() + seconds

    def client() -> tuple[int, int]:
        done = refused = 0
        while time.monotonic() < deadline:
            reply = request(url, "POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
            if reply.status == 200:
                done += 1
            elif reply.status == 429:
                refused += 1
                headers = {key.lower(): value for key, value in reply.headers.items()}
                time.sleep(min(float(headers.get("retry-after", 1)), max(deadline - time.monotonic(), 0)))
            else:
                raise AssertionError(f"{reply.status}: {reply.body[:300]!r}")
        return done, refused

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: client(), range(clients)))
    elapsed = time.monotonic() - start  # the last requests end after the deadline: counted, and their time too
    return sum(done for done, _ in results) * 60 / elapsed, sum(refused for _, refused in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0, help="each throughput window")
    parser.add_argument("--runs", type=int, default=5, help="single requests for the overhead (median)")
    parser.add_argument("--smoke", action="store_true", help="64x64, 2 steps, 10 s windows, 3 runs")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.steps, args.seconds, args.runs = "64x64", 2, 10.0, 3
    ensure_fast_blas()

    import ray
    from api_server import free_port, live_server, request, tiny_registry
    from ray import serve

    from mlx_sd_server.api import Settings, create_app
    from mlx_sd_server.cluster import BOARD_NAMESPACE, ClusterSpec, build
    from mlx_sd_server.registry import TINY_MODEL_NAME, ModelRegistry
    from mlx_sd_server.store import FileStore

    fields = {"prompt": "a lighthouse at dusk", "size": args.size, "steps": args.steps, "seed": 7,
              "model": TINY_MODEL_NAME, "response_format": "b64_json"}  # fmt: skip
    body = json.dumps(fields).encode()

    def one(url: str) -> None:
        reply = request(url, "POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
        assert reply.status == 200, reply.body[:300]

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        models, files = Path(scratch) / "models", Path(scratch) / "files"
        settings = Settings(max_queue=max(8, args.clients))
        app = create_app(tiny_registry(models), FileStore(files), settings)
        with live_server(app) as url:
            plain_one = median_seconds(lambda: one(url), args.runs)
            plain_rpm, plain_refused = throughput(url, body, args.clients, args.seconds)
        rows.append(("plain server (1 worker)", plain_rpm, plain_refused, plain_one))

        cores = len(os.sched_getaffinity(0))
        ray.init(num_cpus=cores, include_dashboard=False, namespace=BOARD_NAMESPACE, log_to_driver=False)
        try:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for replicas in (1, 2):
                spec = ClusterSpec(
                    make_registry=functools.partial(ModelRegistry, [TINY_MODEL_NAME], models),
                    make_store=functools.partial(FileStore, files),
                    settings=dataclass_replace(settings, bound_url=url),
                    replicas=replicas,
                    # the machine's cores shared out: Ray sets a replica's OMP_NUM_THREADS (its BLAS threads) from them
                    replica_actor_options={"num_cpus": cores / replicas},
                    app_name="bench",
                )
                serve.run(build(spec), name="bench", route_prefix="/")
                single = median_seconds(lambda: one(url), args.runs)
                rpm, refused = throughput(url, body, args.clients, args.seconds)
                rows.append((f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''}", rpm, refused, single))
                serve.delete("bench")  # (a rolling update would need the cores the old replica holds)
        finally:
            serve.shutdown()
            ray.shutdown()

    plain_one = rows[0][3]
    print_table(
        f"\ntiny model, {args.size}, {args.steps} steps, {args.clients} clients x {args.seconds:.0f} s; "
        f"{load_average()}",
        ["requests/min", "x plain", "429s", "one req (ms)", "overhead (ms)"],
        [
            (name, [rpm, rpm / rows[0][1], refused, single * 1000, (single - plain_one) * 1000], ".2f")
            for name, rpm, refused, single in rows
        ],
    )


def dataclass_replace(settings, **changes):
    import dataclasses

    return dataclasses.replace(settings, **changes)


if __name__ == "__main__":
    main()
