"""The peer of ``distml serve`` in bench/serve.py: a plain FastAPI endpoint, as one would write
it by hand, running the same artifact (preprocessing and model) once per request.

    python -m bench.plain_server ARTIFACT PORT
"""

from __future__ import annotations

import sys

import numpy as np
import uvicorn
from fastapi import FastAPI

from distml.artifact import load_artifact


def make_app(artifact_dir: str) -> FastAPI:
    artifact = load_artifact(artifact_dir)
    labels = np.asarray(artifact.labels, dtype=object)
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, request: dict) -> dict:  # sync: FastAPI runs it in its thread pool
        tensor = request["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        probs = artifact.predict(x)
        return {"model_name": name, "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
             "data": probs.reshape(-1).tolist()},
            {"name": "label", "datatype": "BYTES", "shape": [len(probs)],
             "data": labels[probs.argmax(-1)].tolist()}]}

    return app


if __name__ == "__main__":
    uvicorn.run(make_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]),
                log_level="warning", access_log=False)
