"""MLServer's custom runtime for the digits artifact (its documented MLModel: load, predict,
with its codecs); bench/serve.py writes the settings (adaptive batching: max_batch_size 64,
max_batch_time 2 ms) and copies this file into the model folder, from which MLServer imports
``mlserver_peer.DigitsRuntime``."""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse


class DigitsRuntime(MLModel):
    async def load(self) -> bool:
        from distml.artifact import load_artifact

        self.artifact = load_artifact(self.settings.parameters.uri)
        self.labels = np.asarray(self.artifact.labels, dtype=object)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        probs = self.artifact.predict(x)
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=[
            NumpyCodec.encode_output("probabilities", probs),
            StringCodec.encode_output("label", self.labels[probs.argmax(-1)].tolist())])
