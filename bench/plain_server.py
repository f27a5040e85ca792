"""Plain FastAPI peers of ``distml serve`` in bench/serve.py, running the same artifact
(preprocessing and model) once per request, no batching:

- untuned: as one would write it first: a sync endpoint (FastAPI runs it in its thread pool),
  the body as a ``dict`` parameter, the response a dict that FastAPI encodes;
- tuned: an ``async def`` endpoint reading the body bytes, one torch thread, the response
  encoded once to bytes.

    python -m bench.plain_server ARTIFACT PORT [--tuned] [--workers N]

``--workers N``: uvicorn's N worker processes on the one port (the tuned app only), what a
user of FastAPI does to use N cores.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import uvicorn
from fastapi import FastAPI, Request, Response

from distml.artifact import load_artifact


def _outputs(name: str, probs: np.ndarray, labels: np.ndarray) -> dict:
    return {"model_name": name, "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
         "data": probs.reshape(-1).tolist()},
        {"name": "label", "datatype": "BYTES", "shape": [len(probs)],
         "data": labels[probs.argmax(-1)].tolist()}]}


def make_app(artifact_dir: str) -> FastAPI:
    artifact = load_artifact(artifact_dir)
    labels = np.asarray(artifact.labels, dtype=object)
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, request: dict) -> dict:  # sync: FastAPI runs it in its thread pool
        tensor = request["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        return _outputs(name, artifact.predict(x), labels)

    return app


def make_tuned_app(artifact_dir: str) -> FastAPI:
    import torch

    torch.set_num_threads(1)  # one request at a time: more threads only contend
    artifact = load_artifact(artifact_dir)
    labels = np.asarray(artifact.labels, dtype=object)
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        tensor = json.loads(await request.body())["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        body = json.dumps(_outputs(name, artifact.predict(x), labels)).encode()
        return Response(body, media_type="application/json")

    return app


def tuned_app_from_env() -> FastAPI:
    """The tuned app of the artifact in DISTML_BENCH_ARTIFACT (uvicorn's workers import it)."""
    return make_tuned_app(os.environ["DISTML_BENCH_ARTIFACT"])


if __name__ == "__main__":
    args = sys.argv[3:]
    if "--workers" in args:
        os.environ["DISTML_BENCH_ARTIFACT"] = sys.argv[1]
        uvicorn.run("bench.plain_server:tuned_app_from_env", factory=True, host="127.0.0.1",
                    port=int(sys.argv[2]), workers=int(args[args.index("--workers") + 1]),
                    log_level="warning", access_log=False)
    else:
        build = make_tuned_app if "--tuned" in args else make_app
        uvicorn.run(build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]),
                    log_level="warning", access_log=False)
