"""Graph optimization for ONNX Runtime: attention, LayerNorm and GELU fused into single operators.

Two steps, both exact up to float rounding:

1. Before export, every ``nn.MultiheadAttention`` of the image tower is replaced by
   :class:`SdpaAttention`: the same weights as three ``Linear`` projections and
   ``scaled_dot_product_attention``. torch's exporter decomposes ``nn.MultiheadAttention`` into a
   packed in-projection, strided slices and ~15 reshapes/transposes per layer, a pattern no ORT
   fusion recognizes; the SDPA form is the one ``onnxscript``'s ORT rewriter is written for.
2. After export, :func:`fuse_for_onnxruntime` runs that rewriter, which turns each layer into one
   ``com.microsoft.Attention`` (packed QKV projection + softmax attention), two
   ``SkipLayerNormalization`` (residual add + LayerNorm) and one ``BiasGelu``; it then splits each
   ``SkipLayerNormalization`` back into its two adds and one ``LayerNormalization``, which ONNX
   Runtime's CPU provider runs about 4x faster (:func:`split_skip_layer_norm`). Each LayerNorm
   stays one operator either way (the export already writes ``LayerNormalization``).

Cost model (ViT-B-32, batch 1): GEMMs are ~85 % of the time and do not change; the fusions remove
~400 small nodes (reshapes, transposes, slices, elementwise GELU pieces, separate bias and
residual adds), each a kernel launch plus a pass over the activations. The fused graph uses
ONNX Runtime contrib operators, so it is a graph for the ``onnxruntime`` backend only; a portable
graph (standard operators) is kept for backends that need one (see :mod:`clipfold.compile.precision`).
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipfold.compile.stages.streamed_save import save_ir
from clipfold.errors import ExportError

log = logging.getLogger(__name__)

# The operators a fused clipfold graph should contain, one family per fusion.
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "Gelu", "FastGelu",
             "QuickGelu")


class SdpaAttention(nn.Module):
    """``nn.MultiheadAttention(batch_first=True)`` as three projections and SDPA; same weights.

    ``forward`` keeps the ``(output, None)`` return of ``need_weights=False`` so open_clip's
    blocks call it unchanged.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        d = mha.embed_dim
        self.heads = mha.num_heads
        self.dropout = 0.0
        w = mha.in_proj_weight.detach()
        b = mha.in_proj_bias.detach() if mha.in_proj_bias is not None else None
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=b is not None) for _ in range(3))
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(w[i * d:(i + 1) * d])
                if b is not None:
                    proj.bias.copy_(b[i * d:(i + 1) * d])
        self.out_proj = mha.out_proj

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = False, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        # Exactly the cases open_clip's towers use: no weights, no padding mask, an additive float
        # mask (a boolean mask means the opposite in SDPA) of shape (L, S) or none.
        if need_weights or key_padding_mask is not None or is_causal:
            raise ExportError("SdpaAttention replaces attention without weights, padding masks or is_causal only")
        if attn_mask is not None and (attn_mask.dtype == torch.bool or attn_mask.dim() != 2):
            raise ExportError(f"SdpaAttention takes an additive 2-D float mask, got {attn_mask.dtype} {tuple(attn_mask.shape)}")
        b, s, d = query.shape
        h = self.heads

        def heads(x):
            return x.reshape(b, x.shape[1], h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(query)), heads(self.k_proj(key)),
                                             heads(self.v_proj(value)), attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d)), None


def _swappable(module: nn.Module) -> bool:
    return (isinstance(module, nn.MultiheadAttention) and module.batch_first and module._qkv_same_embed_dim
            and module.bias_k is None and not module.add_zero_attn and module.dropout == 0.0)


@torch.no_grad()
def use_sdpa_attention(tower: nn.Module) -> int:
    """Replace, in place, every batch-first self-attention of ``tower``; return how many."""
    swapped = 0
    for parent in list(tower.modules()):
        for name, child in list(parent.named_children()):
            if _swappable(child):
                setattr(parent, name, SdpaAttention(child))
                swapped += 1
    return swapped


class ClassTokenBlock(nn.Module):
    """The last block of a class-token ViT computed for the class token alone.

    Only the class token leaves the tower (``pool_type='tok'``), and after the last attention
    nothing mixes tokens: LayerNorm, the MLP and the residuals act per token. So the last block
    needs keys and values for every token but a query, an output projection and an MLP for the
    class token only. Exact up to float rounding; for ViT-B-32 it removes ~7 % of the tower's
    multiply-adds (49 of 50 tokens skip 10 of the block's 12 d x d products).
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
        b = self.block
        y = b.ln_1(x)
        cls = x[:, :1] + b.ls_1(b.attn(y[:, :1], y, y, need_weights=False, attn_mask=attn_mask)[0])
        return cls + b.ls_2(b.mlp(b.ln_2(cls)))


@torch.no_grad()
def keep_class_token_only(tower: nn.Module) -> bool:
    """Compute the last block of an open_clip class-token ViT for the class token alone, in place.

    Applies only where it is exact: an open_clip ``VisionTransformer`` pooling its class token,
    without attention pooling or token outputs, whose last block is a plain batch-first
    ``ResidualAttentionBlock``. Returns whether it applied.
    """
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if type(tower) is not VisionTransformer or tower.pool_type != "tok" or tower.attn_pool is not None \
            or tower.output_tokens or not tower.transformer.batch_first:
        return False
    blocks = tower.transformer.resblocks
    last = blocks[-1]
    if type(last) is not ResidualAttentionBlock or hasattr(last, "ln_1_kv"):
        return False
    if not isinstance(last.attn, (SdpaAttention, nn.MultiheadAttention)) \
            or (isinstance(last.attn, nn.MultiheadAttention) and not last.attn.batch_first):
        return False
    blocks[-1] = ClassTokenBlock(last)
    return True


def fuse_for_onnxruntime(src: Path, dst: Path) -> dict[str, int]:
    """Rewrite the exported graph ``src`` with ONNX Runtime's fused operators into ``dst``.

    Returns the fusions applied by name (e.g. ``{"attention": 12, "skip_layer_normalization": 24}``).
    """
    import onnx_ir as ir
    from onnxscript.optimizer import fold_constants
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    try:
        model = ir.load(str(src))
        model, counts = optimize_for_ort(model)
        # The fusion packs Q, K and V weights with a Concat of initializers; fold it into one
        # initializer (no size limit) so quantizers see a constant weight.
        fold_constants(model, input_size_limit=1 << 62, output_size_limit=1 << 62)
        split = split_skip_layer_norm(model)
        save_ir(model, dst)  # ir.save holds three copies of the weights (peak memory)
    except Exception as exc:  # the rewriter is a third-party pass over our own graph
        raise ExportError(f"ONNX Runtime graph fusion of {Path(src).name} failed: {type(exc).__name__}: {exc}") from exc
    applied = {name: int(n) for name, n in counts.items() if n}
    if split:
        applied["skip_layer_normalization_split"] = split
    log.info("ORT fusions: %s", applied)
    return applied


def _derived(node, suffix: str) -> str | None:
    return f"{node.name}_{suffix}" if node.name else None


def split_skip_layer_norm(model) -> int:
    """Replace, in place, every ``com.microsoft.SkipLayerNormalization`` of the ``onnx_ir`` model
    ``model`` by its bias ``Add``, residual ``Add`` and a standard ``LayerNormalization``; return how many.

    ONNX Runtime's CPU kernel for the fused operator is about 4x slower than the three it replaces
    (ORT 1.32, 2 threads, [B, 50, 768]: 123 vs 48 us at B = 1, 899 vs 188 at 8, 3.6 vs 0.9 ms at
    32), which cost ViT-B-32 ~1.8 ms of its ~60 at batch 1. The sum is formed as
    ``skip + (input + bias)``: for the pattern open_clip's blocks export (the rewriter's "bias
    before the residual add"), that is eager's ``residual + (projection + bias)`` exactly; the
    fused operator itself adds ``(input + skip) + bias``, equal up to one rounding. The fusion's
    mean and inverse standard deviation outputs are training outputs; a graph that reads them is
    refused. A missing ``epsilon`` is the fused operator's default, 1e-12, written out (the
    standard LayerNormalization's default differs).
    """
    import onnx_ir as ir

    split = 0
    for node in list(model.graph):
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft":
            continue
        x, skip, gamma, beta, bias = (list(node.inputs) + [None] * 5)[:5]
        out, mean, inv_std, total = (list(node.outputs) + [None] * 4)[:4]
        if any(v is not None and (v.uses() or v.is_graph_output()) for v in (mean, inv_std)):
            raise ExportError(f"{node.name}: a SkipLayerNormalization whose mean or inverse standard deviation "
                              "output is read cannot be split into standard operators")
        epsilon = node.attributes.get("epsilon")
        new_nodes, new_sums = [], []
        if bias is not None:
            new_nodes.append(ir.Node("", "Add", [x, bias], name=_derived(node, "bias")))
            x = new_nodes[-1].outputs[0]
            new_sums.append(x)
        new_nodes.append(ir.Node("", "Add", [skip, x], name=_derived(node, "residual")))
        added = new_nodes[-1].outputs[0]
        new_sums.append(added)
        attributes = [ir.AttrInt64("axis", -1),
                      ir.AttrFloat32("epsilon", epsilon.as_float() if epsilon is not None else 1e-12)]
        new_nodes.append(ir.Node("", "LayerNormalization", [added, gamma, *([beta] if beta is not None else [])],
                                 attributes, name=_derived(node, "ln")))
        for value in new_sums:  # the new values only: the node's own inputs keep what they declare
            value.shape = out.shape
            if out.type is not None:
                value.type = out.type
        old_values, new_values = [out], [new_nodes[-1].outputs[0]]
        if total is not None:
            old_values.append(total)
            new_values.append(added)
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], new_nodes, old_values, new_values)
        split += 1
    return split


def op_counts(path: Path) -> dict[str, int]:
    """Operator type -> count for the top-level graph of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(node.op_type for node in model.graph.node))
