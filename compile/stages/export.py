"""Stage 4: the one exported graph — uint8 pixels in, top-k scores, indices and embedding out."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipfold.compile.heads.ir import Head
from clipfold.compile.stages.streamed_save import save_ir
from clipfold.errors import ExportError
from clipfold.runtime.bundle.schema import TensorSpec

log = logging.getLogger(__name__)

# Above this many parameter bytes ONNX's 2 GiB protobuf limit is near: weights go to a side file.
EXTERNAL_DATA_BYTES = 1_500_000_000


class HeadModule(nn.Module):
    """The folded head: unit embedding ``f`` (B, D) -> logits (B, C).

    All linear branches arrive as one matrix that already carries ``exp(logit_scale)``; a cache
    branch is one exp(GEMM + key bias) whose outputs either join the embedding in the single outer
    MatMul or, for one-hot values, are summed per class (:func:`~clipfold.compile.heads.ir._fold_cache`).
    A CLIP-Adapter transform runs first; an APE cache gathers its channels and renormalizes them.
    """

    def __init__(self, head: Head):
        super().__init__()
        folded = head.fold()
        self.register_buffer("weight", folded.weight)
        self.register_buffer("bias", folded.bias)
        self.has_bias = bool(folded.bias.abs().max() > 0)
        self.slots = tuple(c.slots for c in folded.caches)
        self.gathers = tuple(c.channels is not None for c in folded.caches)
        for i, cache in enumerate(folded.caches):
            self.register_buffer(f"cache_keys_{i}", cache.keys)
            self.register_buffer(f"cache_bias_{i}", cache.key_bias)
            if cache.channels is not None:
                self.register_buffer(f"cache_channels_{i}", cache.channels.long())
        self.ratio = None
        if folded.transform is not None:
            self.register_buffer("transform_down", folded.transform.down.float())
            self.register_buffer("transform_up", folded.transform.up.float())
            self.ratio = float(folded.transform.ratio)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.ratio is not None:
            adapted = torch.relu(torch.relu(features @ self.transform_down.T) @ self.transform_up.T)
            features = F.normalize(self.ratio * adapted + (1.0 - self.ratio) * features, dim=-1)
        parts, reduced = [features], []
        for i, slots in enumerate(self.slots):
            query = features
            if self.gathers[i]:
                query = F.normalize(features.index_select(-1, getattr(self, f"cache_channels_{i}")), dim=-1)
            a = torch.exp(query @ getattr(self, f"cache_keys_{i}").T + getattr(self, f"cache_bias_{i}"))
            if slots is None:
                parts.append(a)
            else:
                reduced.append(a.reshape(a.shape[0], -1, slots).sum(-1))
        logits = (torch.cat(parts, dim=-1) if len(parts) > 1 else features) @ self.weight
        for r in reduced:
            logits = logits + r
        return logits + self.bias if self.has_bias else logits


def one_line(exc: BaseException) -> str:
    """An exporter failure in one line: the innermost cause's type and first line (torch's export
    errors wrap the cause in many lines of advice)."""
    while exc.__cause__ is not None and exc.__cause__ is not exc:
        exc = exc.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"


def pooled(output):
    """A tower's pooled embedding: CoCa's towers return ``(pooled, tokens)``, as its ``encode_image`` reads."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _scores_topk(logits: torch.Tensor, sigmoid: bool, top_k: int):
    scores = logits.sigmoid() if sigmoid else logits.softmax(dim=-1)
    return scores.topk(top_k, dim=-1)


class ClassifierGraph(nn.Module):
    """Folded image tower + L2 norm + the folded head + softmax/sigmoid + TopK.

    An image-conditioned adapter (CoCoOp) passes ``logits_module`` instead of a head: it maps the
    unit embedding to logits itself. The ``embedding`` output is always the backbone's unit
    embedding, which extra heads (:class:`HeadGraph`) read.
    """

    def __init__(self, visual: nn.Module, head: Head | None, top_k: int, logits_module: nn.Module | None = None,
                 activation: str = "softmax"):
        super().__init__()
        self.visual = visual
        self.head = HeadModule(head) if head is not None else logits_module
        self.sigmoid = (head.activation if head is not None else activation) == "sigmoid"
        self.top_k = int(top_k)

    def forward(self, pixels: torch.Tensor):
        features = F.normalize(pooled(self.visual(pixels.to(torch.float32))), dim=-1)
        top_scores, top_indices = _scores_topk(self.head(features), self.sigmoid, self.top_k)
        return top_scores, top_indices, features


class EmbeddingGraph(nn.Module):
    """Folded image tower + L2 norm only: the graph of a bundle whose head the top-k kernel scores."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixels: torch.Tensor):
        return F.normalize(pooled(self.visual(pixels.to(torch.float32))), dim=-1)


class HeadGraph(nn.Module):
    """An extra head: the bundle's unit embedding in, top-k scores and indices out."""

    def __init__(self, head: Head, top_k: int):
        super().__init__()
        self.head = HeadModule(head)
        self.sigmoid = head.activation == "sigmoid"
        self.top_k = int(top_k)

    def forward(self, embedding: torch.Tensor):
        return _scores_topk(self.head(embedding), self.sigmoid, self.top_k)


def head_io_specs(embed_dim: int, top_k: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    inputs = (TensorSpec("embedding", "float32", ("batch", embed_dim)),)
    outputs = (TensorSpec("scores", "float32", ("batch", top_k)), TensorSpec("indices", "int64", ("batch", top_k)))
    return inputs, outputs


def io_specs(image_size: tuple[int, int], top_k: int, embed_dim: int,
             embedding_only: bool = False) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    h, w = image_size
    inputs = (TensorSpec("pixels", "uint8", ("batch", 3, h, w)),)
    embedding = (TensorSpec("embedding", "float32", ("batch", embed_dim)),)
    if embedding_only:
        return inputs, embedding
    outputs = (
        TensorSpec("scores", "float32", ("batch", top_k)),
        TensorSpec("indices", "int64", ("batch", top_k)),
        *embedding,
    )
    return inputs, outputs


def export_onnx(graph: ClassifierGraph | EmbeddingGraph, path: Path, image_size: tuple[int, int], opset: int) -> None:
    """Export the classifier (or the embedding graph) with torch's dynamo exporter and a dynamic batch."""
    example = torch.randint(0, 256, (2, 3, *image_size), dtype=torch.uint8)
    names = ["embedding"] if isinstance(graph, EmbeddingGraph) else ["scores", "indices", "embedding"]
    _export(graph, example, "pixels", names, path, opset, type(graph.visual).__name__)


def export_head_onnx(graph: HeadGraph, path: Path, embed_dim: int, opset: int) -> None:
    example = F.normalize(torch.randn(2, embed_dim), dim=-1)
    _export(graph, example, "embedding", ["scores", "indices"], path, opset, "head")


def _export(graph: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str], path: Path,
            opset: int, what: str) -> None:
    graph.eval()
    param_bytes = sum(p.numel() * p.element_size() for p in graph.state_dict().values())
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph, (example,), dynamo=True, verbose=False, opset_version=opset,
                input_names=[input_name], output_names=output_names,
                dynamic_shapes={input_name: {0: batch}},
            )
            if param_bytes > EXTERNAL_DATA_BYTES:
                program.save(str(path), external_data=True)
            else:  # program.save's own writer holds three copies of the weights (peak memory)
                save_ir(program.model, path)
    except Exception as exc:
        raise ExportError(f"ONNX export of {what} failed: {one_line(exc)}") from exc
