"""Triton Python-backend model written by ``clipfold export triton``: class indices -> label strings.

The labels are the bundle's, one per line in ``labels.txt`` beside this model's version folder.
"""

import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        with open(os.path.join(args["model_repository"], "labels.txt"), encoding="utf-8") as fh:
            # split on "\n" only: str.splitlines() also splits on other separators a label may hold
            self.labels = np.array([line.encode("utf-8") for line in fh.read().split("\n")[:-1]], dtype=object)

    def execute(self, requests):
        responses = []
        for request in requests:
            indices = pb_utils.get_input_tensor_by_name(request, "indices").as_numpy()
            if indices.size and (indices.min() < 0 or indices.max() >= len(self.labels)):
                message = f"class index out of range 0..{len(self.labels) - 1}: got {indices.min()}..{indices.max()}"
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("labels", self.labels[indices])]))
        return responses
