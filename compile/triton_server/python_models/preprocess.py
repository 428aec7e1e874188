"""Triton Python-backend model written by ``clipfold export triton``: encoded image bytes -> uint8 pixels.

The transform is clipfold's own (``clipfold.runtime``), bit-identical to open_clip's eval transform;
its settings come from ``preprocess.json`` beside this model's version folder. A request whose image
cannot be decoded gets its own error; the other requests of the batch are answered.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from clipfold.errors import ClipfoldError
from clipfold.runtime.bundle.schema import PreprocessSpec
from clipfold.runtime.images import load_image
from clipfold.runtime.preprocess import preprocess_one


class TritonPythonModel:
    def initialize(self, args):
        with open(os.path.join(args["model_repository"], "preprocess.json"), encoding="utf-8") as fh:
            self.spec = PreprocessSpec(**json.load(fh))

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
            try:
                pixels = np.stack([preprocess_one(load_image(bytes(item)), self.spec) for item in images])
            except ClipfoldError as exc:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
                continue
            except Exception as exc:  # noqa: BLE001 - one request's failure must not fail the others
                message = f"preprocessing failed: {type(exc).__name__}: {exc}"
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("pixels", pixels)]))
        return responses
