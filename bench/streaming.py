"""What streaming costs: a streamed generation with partial images against the same one without them.

    python bench/streaming.py [--size 256x256] [--steps 8] [--partials 2] [--runs 5]

Serves the built-in tiny random-weight model with Hypercorn on a local socket and times, median of --runs
after a warm-up, three POST /v1/images/generations for the same job: not streamed (b64_json), streamed with
`partial_images: 0` (only the completed event) and streamed with --partials partial images (each a real
decode of the current denoised latents). The tiny model's steps are cheap, so the decodes' share is large
here; on a real model the ratio shrinks towards 1 + partials * decode / generation. The script re-execs
itself with OpenBLAS preloaded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from mlx_sd_server.blas import ensure_fast_blas  # noqa: E402

from common import load_average, median_seconds, print_table  # noqa: E402


def streamed(url: str, body: bytes) -> int:
    """POST and read the whole event stream; returns the number of events."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    try:
        conn.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()[:500]
        return response.read().count(b"\nevent: ") + 1
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--partials", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    ensure_fast_blas()

    from api_server import live_server, request, tiny_registry
    from mlx_sd_server.api import create_app
    from mlx_sd_server.store import FileStore

    fields = {"prompt": "a lighthouse at dusk", "size": args.size, "steps": args.steps, "seed": 7,
              "sample_method": "euler", "response_format": "b64_json"}
    with tempfile.TemporaryDirectory() as scratch:
        app = create_app(tiny_registry(Path(scratch) / "models"), FileStore(Path(scratch) / "files"))
        with live_server(app) as url:
            plain = json.dumps(fields).encode()
            no_partials = json.dumps({**fields, "stream": True, "partial_images": 0}).encode()
            partials = json.dumps({**fields, "stream": True, "partial_images": args.partials}).encode()
            assert streamed(url, partials) == args.partials + 1  # also the warm-up
            times = {
                "not streamed": median_seconds(lambda: request(url, "POST", "/v1/images/generations", plain,
                                                               {"Content-Type": "application/json"}), args.runs),
                "streamed, no partial images": median_seconds(lambda: streamed(url, no_partials), args.runs),
                f"streamed, {args.partials} partial images": median_seconds(lambda: streamed(url, partials), args.runs),
            }
    base = times["streamed, no partial images"]
    print(f"tiny-random-sd {args.size}, {args.steps} steps, median of {args.runs}; {load_average()}")
    print_table("POST /v1/images/generations", ["seconds", "x no partials"],
                [(name, [t, t / base], ".3f") for name, t in times.items()])


if __name__ == "__main__":
    main()
