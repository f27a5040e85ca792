"""LitServe serving the digits artifact, batching on (its documented LitAPI: decode_request,
batch, predict, unbatch, encode_response), at the protocol's infer path with its JSON body.

    python bench/peers/litserve_peer.py ARTIFACT PORT
"""

from __future__ import annotations

import sys

import litserve as ls
import numpy as np


class DigitsAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        from distml.artifact import load_artifact

        self.artifact = load_artifact(sys.argv[1])
        self.labels = np.asarray(self.artifact.labels, dtype=object)

    def decode_request(self, request: dict) -> np.ndarray:
        tensor = request["inputs"][0]
        return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])

    def batch(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        return np.concatenate(inputs), [len(x) for x in inputs]  # requests of any row count

    def predict(self, batch: tuple[np.ndarray, list[int]]) -> list[np.ndarray]:
        x, sizes = batch
        return np.split(self.artifact.predict(x), np.cumsum(sizes)[:-1])

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    def encode_response(self, probs: np.ndarray) -> dict:
        return {"model_name": "digits", "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
             "data": probs.reshape(-1).tolist()},
            {"name": "label", "datatype": "BYTES", "shape": [len(probs)],
             "data": self.labels[probs.argmax(-1)].tolist()}]}


if __name__ == "__main__":
    api = DigitsAPI(max_batch_size=64, batch_timeout=0.002, api_path="/v2/models/digits/infer")
    ls.LitServer(api, accelerator="cpu", workers_per_device=1).run(
        host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", generate_client_file=False)
