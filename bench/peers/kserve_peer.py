"""KServe's Python model server serving the digits artifact (its documented kserve.Model with
the Open Inference Protocol's InferRequest/InferResponse). It has no batching of its own
(KServe batches in a sidecar agent in front of it). Its gRPC server is off: REST is measured.

    python bench/peers/kserve_peer.py ARTIFACT PORT
"""

from __future__ import annotations

import sys

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class Digits(Model):
    def __init__(self, name: str, artifact: str) -> None:
        super().__init__(name)
        self.path = artifact
        self.load()

    def load(self) -> bool:
        from distml.artifact import load_artifact

        self.artifact = load_artifact(self.path)
        self.labels = np.asarray(self.artifact.labels, dtype=object)
        self.ready = True
        return self.ready

    async def predict(self, payload: InferRequest, headers: dict | None = None,
                      response_headers: dict | None = None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        probs = self.artifact.predict(x)
        out = InferOutput(name="probabilities", shape=list(probs.shape), datatype="FP32")
        out.set_data_from_numpy(probs)
        label = InferOutput(name="label", shape=[len(probs)], datatype="BYTES")
        label.set_data_from_numpy(self.labels[probs.argmax(-1)].astype(np.object_))
        return InferResponse(model_name=self.name, infer_outputs=[out, label],
                             response_id=payload.id or "")


if __name__ == "__main__":
    # Per-request latency logging off, as access logs are off for every server here.
    ModelServer(http_port=int(sys.argv[2]), grpc_port=int(sys.argv[3]), workers=1,
                enable_grpc=False, enable_latency_logging=False).start(
        [Digits("digits", sys.argv[1])])
