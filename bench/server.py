"""The HTTP server's overhead: one request end to end against a direct engine call for the same job.

    python bench/server.py [--size 256x256] [--steps 4] [--runs 5] [--response-format b64_json]

Serves the built-in tiny random-weight model (its engine time is small, so the server's share shows) with
Hypercorn on a real local socket, as `mlx-sd-server serve` does, and times, median of --runs after a warm-up:
the engine generating the job directly (the same loaded pipeline the server uses), a POST
/v1/images/generations for the same job (parsing, queue, worker, PNG encoding, response), and a GET
/v1/models as the floor of any request. The script re-execs itself with OpenBLAS preloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

from common import load_average, median_seconds, print_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--response-format", choices=["b64_json", "url"], default="b64_json")
    args = parser.parse_args()
    ensure_fast_blas()

    from api_server import live_server, request, tiny_registry
    from mlx_sd_server.api import create_app
    from mlx_sd_server.engine.pipeline import drive
    from mlx_sd_server.job import build_job
    from mlx_sd_server.registry import TINY_MODEL_NAME
    from mlx_sd_server.store import FileStore

    fields = {"prompt": "a lighthouse at dusk", "size": args.size, "steps": args.steps, "seed": 7,
              "sample_method": "euler", "cfg_scale": 7.0}
    with tempfile.TemporaryDirectory() as scratch:
        registry = tiny_registry(Path(scratch) / "models")
        app = create_app(registry, FileStore(Path(scratch) / "files"))
        pipeline = registry.pipeline()
        job = build_job({**fields, "model": TINY_MODEL_NAME})
        direct = median_seconds(lambda: drive(pipeline.generate(job)), args.runs)

        body = json.dumps({**fields, "model": TINY_MODEL_NAME, "response_format": args.response_format}).encode()

        def post() -> None:
            reply = request(url, "POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
            assert reply.status == 200, reply.body[:500]

        with live_server(app) as url:
            served = median_seconds(post, args.runs)
            floor = median_seconds(lambda: request(url, "GET", "/v1/models"), args.runs)

    print(f"tiny-random-sd {args.size}, {args.steps} steps, response_format={args.response_format}, "
          f"median of {args.runs}; {load_average()}")
    print_table("seconds", ["s", "ms over engine"], [
        ("engine call (generate)", [direct, None], ".3f"),
        ("POST /v1/images/generations", [served, (served - direct) * 1000], ".3f"),
        ("GET /v1/models (any request)", [floor, None], ".3f"),
    ])
    print(f"server overhead: {(served - direct) * 1000:.0f} ms per request, "
          f"{(served - direct) / direct:.1%} of the engine time")


if __name__ == "__main__":
    main()
