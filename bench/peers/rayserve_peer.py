"""Ray Serve serving the digits artifact, batching on as its docs show it: a deployment whose
batched method is ``@serve.batch`` (max_batch_size 64, batch_wait_timeout_s 2 ms) and
``max_ongoing_requests`` above the batch size (Ray's default of 5 would cap every batch at 5),
one replica, at the protocol's infer path with its JSON body.

    python bench/peers/rayserve_peer.py ARTIFACT PORT
"""

from __future__ import annotations

import json
import signal
import sys

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response


@serve.deployment(max_ongoing_requests=128)
class Digits:
    def __init__(self, artifact_dir: str) -> None:
        import torch

        from distml.artifact import load_artifact

        torch.set_num_threads(1)
        self.artifact = load_artifact(artifact_dir)
        self.labels = np.asarray(self.artifact.labels, dtype=object)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def predict(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(x) for x in xs]  # requests of any row count
        return np.split(self.artifact.predict(np.concatenate(xs)), np.cumsum(sizes)[:-1])

    async def __call__(self, request: Request) -> Response:
        tensor = json.loads(await request.body())["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        probs = await self.predict(x)
        return Response(json.dumps({"model_name": "digits", "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
             "data": probs.reshape(-1).tolist()},
            {"name": "label", "datatype": "BYTES", "shape": [len(probs)],
             "data": self.labels[probs.argmax(-1)].tolist()}]}),
            media_type="application/json")


if __name__ == "__main__":
    # a cluster of its own (address "local"), not one that another peer started
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds through the finally
    try:
        serve.run(Digits.bind(sys.argv[1]), name="digits",
                  route_prefix="/v2/models/digits/infer")
        signal.pause()
    finally:  # Ray's own processes too
        serve.shutdown()
        ray.shutdown()
