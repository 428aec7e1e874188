"""The ``fp32-native`` variant: the image tower as :mod:`clipfold.kernels.vit.tower` weights, run by the
package's own C kernel instead of ONNX Runtime, and the head as a small ONNX graph after it.

It exists for CPU latency at small batches: the tower's GEMMs are the time, and the kernel's run
faster than ONNX Runtime's on the CPUs this project targets (``make bench`` reports the pair).
Only open_clip's plain class-token ``VisionTransformer`` is taken; :func:`tower_tensors` names what
else it found. The weights are read from the tower after input normalization was folded into its
patch embedding, so the variant takes the same raw uint8 pixels as the ONNX graphs.

This module builds the variant at compile time (torch in, packed weights out, verified against
open_clip eager); ``runtime/backends/native.py`` (the ``native`` backend) runs it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipfold.errors import ExportError
from clipfold.kernels.vit.tower import VitWeights
from clipfold.runtime.bundle.layout import NATIVE_DIR, NATIVE_HEAD_FILE


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _bias(module: nn.Module, size: int) -> np.ndarray:
    """A module's bias, or zeros where it has none."""
    bias = getattr(module, "bias", None)
    return _np(bias) if bias is not None else np.zeros(size, np.float32)


def _attention_weights(attn: nn.Module, width: int) -> tuple[np.ndarray, np.ndarray, nn.Linear, int]:
    """``(W_qkv [3W, W], b_qkv [3W], out_proj, heads)`` from ``nn.MultiheadAttention`` or its
    SDPA replacement (:class:`~clipfold.compile.stages.optimize.SdpaAttention`)."""
    from clipfold.compile.stages.optimize import SdpaAttention

    if isinstance(attn, SdpaAttention):
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        weight = torch.cat([p.weight for p in projs])
        return _np(weight), np.concatenate([_bias(p, width) for p in projs]), attn.out_proj, attn.heads
    if isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.batch_first:
        if attn.bias_k is not None or attn.add_zero_attn:
            raise ExportError("fp32-native: attention with extra key/value biases or zero attention is not supported")
        bias = _np(attn.in_proj_bias) if attn.in_proj_bias is not None else np.zeros(3 * width, np.float32)
        return _np(attn.in_proj_weight), bias, attn.out_proj, attn.num_heads
    raise ExportError(f"fp32-native: unsupported attention module {type(attn).__name__} "
                      "(expected batch-first nn.MultiheadAttention)")


def _scale(ls: nn.Module, width: int) -> np.ndarray:
    """A layer scale as a per-channel factor (identity: ones)."""
    if isinstance(ls, nn.Identity):
        return np.ones(width, np.float32)
    gamma = getattr(ls, "gamma", None)
    if gamma is None or tuple(gamma.shape) != (width,) or getattr(ls, "inplace", False):
        raise ExportError(f"fp32-native: unsupported layer scale {type(ls).__name__}")
    return _np(gamma)


def _activation(act: nn.Module) -> int:
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return 1
    if type(act) is nn.GELU and act.approximate == "none":
        return 0
    raise ExportError(f"fp32-native: unsupported MLP activation {act!r} (expected nn.GELU or QuickGELU)")


def _layer_norm(ln: nn.Module, width: int) -> tuple[np.ndarray, np.ndarray, float]:
    if not isinstance(ln, nn.LayerNorm) or tuple(ln.normalized_shape) != (width,) or not ln.elementwise_affine:
        raise ExportError(f"fp32-native: unsupported normalization {ln!r} (expected an affine LayerNorm({width}))")
    return _np(ln.weight), _bias(ln, width), float(ln.eps)


def check_tower(visual: nn.Module) -> None:
    """Refuse, naming each part, a tower the kernel cannot run; cheap, so compile asks it right
    after the model loads, before any export (the same checks :func:`tower_tensors` relies on)."""
    from open_clip.transformer import VisionTransformer

    if type(visual) is not VisionTransformer:
        raise ExportError(f"fp32-native runs open_clip's VisionTransformer only; this tower is {type(visual).__name__} "
                          "(use the fp32 ONNX variant)")
    problems = []
    if visual.attn_pool is not None or getattr(visual, "attn_pool_contrastive", None) is not None:
        problems.append("attentional pooling")
    if visual.pool_type != "tok":
        problems.append(f"pool_type {visual.pool_type!r} (expected 'tok')")
    if visual.output_tokens:
        problems.append("token outputs")
    if visual.final_ln_after_pool:
        problems.append("final_ln_after_pool")
    if not isinstance(visual.proj, nn.Parameter):
        problems.append(f"projection {type(visual.proj).__name__} (expected a linear projection matrix)")
    if not isinstance(visual.patch_dropout, nn.Identity) and visual.training:
        problems.append("patch dropout in training mode")
    conv = visual.conv1
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size != conv.stride or conv.padding not in ((0, 0), "valid") \
            or conv.kernel_size[0] != conv.kernel_size[1] or conv.groups != 1 or conv.dilation != (1, 1):
        problems.append(f"patch embedding {conv!r} (expected a square, unpadded conv with stride = kernel)")
    elif any(int(s) % conv.kernel_size[0] for s in visual.image_size):
        image_h, image_w = (int(s) for s in visual.image_size)
        problems.append(f"image size {image_h}x{image_w} is not a multiple of the patch {conv.kernel_size[0]}")
    if problems:
        raise ExportError("fp32-native cannot run this ViT: " + "; ".join(problems))


def tower_tensors(visual: nn.Module) -> VitWeights:
    """Pack an open_clip class-token ViT (input normalization already folded) for the kernel.

    Refused, naming the part: any other tower type, attention pooling, pooling other than the
    class token, token outputs, LayerNorm after pooling, non-linear projections, custom blocks,
    cross-attention, mixed LayerNorm epsilons.
    """
    check_tower(visual)
    width = int(visual.class_embedding.shape[0])
    blocks = list(visual.transformer.resblocks)
    if not blocks:
        raise ExportError("fp32-native: the tower has no transformer blocks")
    tensors, ln_pre, eps_seen = _outer_tensors(visual, width)
    shape = None  # (heads, activation, MLP width): the kernel takes one for every block
    for i, block in enumerate(blocks):
        block_tensors, block_shape, block_eps = _block_tensors(i, block, width, last=i == len(blocks) - 1)
        if shape not in (None, block_shape):
            raise ExportError(f"fp32-native: block {i} differs from block 0 in heads, activation or MLP width")
        shape = block_shape
        tensors.update(block_tensors)
        eps_seen |= block_eps
    if len(eps_seen) != 1:
        raise ExportError(f"fp32-native: the tower's LayerNorms use different epsilons {sorted(eps_seen)}")
    heads, act, mlp = shape
    grid_h, grid_w = (int(g) for g in visual.grid_size)
    config = {"layers": len(blocks), "width": width, "heads": heads, "mlp": mlp, "grid_h": grid_h, "grid_w": grid_w,
              "patch": int(visual.conv1.kernel_size[0]), "out_dim": int(tensors["proj_w"].shape[1]), "act": act,
              "ln_pre": ln_pre}
    return VitWeights.from_tensors(config, eps_seen.pop(), tensors)


def _outer_tensors(visual: nn.Module, width: int) -> tuple[dict[str, np.ndarray], int, set[float]]:
    """The tensors around the blocks: patch embedding, positions (the class embedding added to row 0,
    as eager adds it), LayerNorms before and after the blocks, projection; with the ``ln_pre`` flag
    (0: the tower has none) and the LayerNorm epsilons seen."""
    conv = visual.conv1
    tensors: dict[str, np.ndarray] = {}
    tensors["patch_w"] = _np(conv.weight).reshape(width, -1).T  # conv weight [W, 3, p, p]
    tensors["patch_b"] = _bias(conv, width)
    pos = _np(visual.positional_embedding).copy()
    pos[0] += _np(visual.class_embedding)  # eager adds the class embedding to position 0's row
    tensors["pos"] = pos
    eps_seen = set()
    if isinstance(visual.ln_pre, nn.Identity):
        ln_pre = 0
        tensors["ln_pre_w"], tensors["ln_pre_b"] = np.ones(width, np.float32), np.zeros(width, np.float32)
    else:
        ln_pre = 1
        tensors["ln_pre_w"], tensors["ln_pre_b"], eps = _layer_norm(visual.ln_pre, width)
        eps_seen.add(eps)
    tensors["ln_post_w"], tensors["ln_post_b"], eps = _layer_norm(visual.ln_post, width)
    eps_seen.add(eps)
    tensors["proj_w"] = _np(visual.proj)
    tensors["proj_b"] = np.zeros(tensors["proj_w"].shape[1], np.float32)
    return tensors, ln_pre, eps_seen


def _block_tensors(i: int, block: nn.Module, width: int, last: bool
                   ) -> tuple[dict[str, np.ndarray], tuple[int, int, int], set[float]]:
    """Block ``i``'s tensors (layer scales folded into the output projections), its (heads,
    activation, MLP width) and its LayerNorm epsilons. The last block computes only the class
    token's query (``q_w``, ``q_b``), and keys and values for every token."""
    from open_clip.transformer import ResidualAttentionBlock

    from clipfold.compile.stages.optimize import ClassTokenBlock

    if isinstance(block, ClassTokenBlock):
        if not last:
            raise ExportError("fp32-native: a class-token-only block that is not the last block")
        block = block.block
    if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
        raise ExportError(f"fp32-native: block {i} is {type(block).__name__}; expected open_clip's "
                          "ResidualAttentionBlock (self-attention)")
    qkv_w, qkv_b, out_proj, heads = _attention_weights(block.attn, width)
    fc1, fc2 = block.mlp.c_fc, block.mlp.c_proj
    act, mlp = _activation(block.mlp.gelu), fc1.out_features
    ls1, ls2 = _scale(block.ls_1, width), _scale(block.ls_2, width)
    p, tensors = f"{i}.", {}
    tensors[p + "ln1_w"], tensors[p + "ln1_b"], eps1 = _layer_norm(block.ln_1, width)
    tensors[p + "ln2_w"], tensors[p + "ln2_b"], eps2 = _layer_norm(block.ln_2, width)
    if last:  # the class token's query apart; keys and values for all tokens
        tensors["q_w"], tensors["q_b"] = qkv_w[:width].T, qkv_b[:width]
        tensors[p + "qkv_w"], tensors[p + "qkv_b"] = qkv_w[width:].T, qkv_b[width:]
    else:
        tensors[p + "qkv_w"], tensors[p + "qkv_b"] = qkv_w.T, qkv_b
    tensors[p + "out_w"], tensors[p + "out_b"] = _np(out_proj.weight).T * ls1, _bias(out_proj, width) * ls1
    tensors[p + "fc1_w"], tensors[p + "fc1_b"] = _np(fc1.weight).T, _bias(fc1, mlp)
    tensors[p + "fc2_w"], tensors[p + "fc2_b"] = _np(fc2.weight).T * ls2, _bias(fc2, width) * ls2
    return tensors, (heads, act, mlp), {eps1, eps2}


def build_native_variant(visual: nn.Module, head, stage: Path, inputs, outputs, top_k: int, kernel_head,
                         reference, verify_cfg, opset: int):
    """Write ``stage/native`` (tower weights, and the head graph unless the top-k kernel scores the
    head), run it through the runtime's ``native`` backend on the verification images and return
    its :class:`~clipfold.runtime.bundle.schema.Variant`; a miss against open_clip eager raises."""
    from clipfold.compile.stages.export import HeadGraph, export_head_onnx
    from clipfold.compile.stages.verify import verify_backend
    from clipfold.runtime.backends.kernel_head import KernelHeadBackend
    from clipfold.runtime.backends.native import NativeBackend
    from clipfold.runtime.bundle.schema import Variant

    if kernel_head is None and head is None:
        raise ExportError("fp32-native needs a folded head; an image-conditioned head (CoCoOp) runs only inside "
                          "the ONNX graph (use the fp32 variant)")
    folder = stage / NATIVE_DIR
    weights = tower_tensors(visual)
    weights.save(folder)
    embed_dim = weights.config["out_dim"]
    if kernel_head is None:
        export_head_onnx(HeadGraph(head, top_k), folder / NATIVE_HEAD_FILE, embed_dim, opset)
    backend = NativeBackend(folder, inputs, outputs)
    if kernel_head is not None:
        backend = KernelHeadBackend(backend, kernel_head)
    parity = verify_backend(backend, reference, verify_cfg, "fp32-native", NATIVE_DIR)
    return Variant(name="fp32-native", file=NATIVE_DIR, format="clipfold-vit", precision="fp32", inputs=inputs,
                   outputs=outputs, parity=parity, top_k=top_k, backends=("native",))
