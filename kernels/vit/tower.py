"""A class-token ViT image tower run by this package's own C kernel (``_vit.c``): uint8 pixels in,
unit embeddings out, no ONNX Runtime.

On the 2-core AVX2 machines this project targets, the tower's GEMMs at batch 1 (50 rows each for
ViT-B/32) are where ONNX Runtime's MLAS leaves speed behind when it streams the weights from memory;
the kernel's 4 x 24 tiles with panel prefetch run those shapes faster (see ``_vit.c``). On CPUs with
AVX-512 and AMX it is the slower fp32 engine (ONNX Runtime's MLAS uses AVX-512 there, and bf16 runs
on AMX), so it is dispatched only where it measures faster: ``compile --if-faster fp32-native``
(:mod:`clipfold.compile.precision.speed_check`) and ``variant="auto"`` (:mod:`clipfold.runtime.variant_choice`). What it
runs is fixed: open_clip's ``VisionTransformer`` with a class token, pre-norm blocks (GELU or
QuickGELU MLP, optional layer scale folded in), the last block for the class token alone, then
``ln_post`` and the projection. :func:`pack_tower` refuses anything else.

Storage (:class:`VitWeights`): ``config`` (int64, ``CONFIG_KEYS``), ``offsets`` (int64, float
offset of each tensor in ``weights``, every one 64-byte aligned) and one float32 ``weights``
buffer, with GEMM weights pre-packed in 24-column panels. :meth:`VitWeights.save` writes
``vit.json`` + ``vit.bin`` into a folder; :meth:`VitWeights.load` reads them back, checked.
"""

from __future__ import annotations

import ctypes
import json
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import numpy as np

from clipfold.errors import BundleError, ConfigError
from clipfold.kernels.cpu_runtime import default_threads, load_extension

CONFIG_KEYS = ("layers", "width", "heads", "mlp", "grid_h", "grid_w", "patch", "out_dim", "act", "ln_pre")
GLOBALS = ("patch_w", "patch_b", "pos", "ln_pre_w", "ln_pre_b", "ln_post_w", "ln_post_b", "proj_w", "proj_b")
LAYER = ("ln1_w", "ln1_b", "qkv_w", "qkv_b", "out_w", "out_b", "ln2_w", "ln2_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b")
PACKED = {"patch_w", "proj_w", "qkv_w", "out_w", "fc1_w", "fc2_w", "q_w"}  # [K, N] GEMM weights
PANEL = 24  # columns per weight panel (the kernel's NR)
MAX_THREADS = 64  # the kernel's limit
ALIGN = 16  # floats: every tensor starts on a 64-byte line
FORMAT = "clipfold-vit"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "vit.json", "vit.bin"


def pack_panels(w: np.ndarray) -> np.ndarray:
    """``[K, N]`` -> panels of 24 columns, ``[ceil(N / 24), K, 24]`` with zero columns past N, flat."""
    k, n = w.shape
    panels = -(-n // PANEL)
    padded = np.zeros((k, panels * PANEL), np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, PANEL).transpose(1, 0, 2)).ravel()


def _aligned_empty(floats: int) -> np.ndarray:
    """A float32 array whose data starts on a 64-byte boundary (numpy guarantees only 16)."""
    raw = np.empty(floats + ALIGN, np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start:start + floats]


def _slot_names(layers: int) -> list[str]:
    names = list(GLOBALS)
    for layer in range(layers):
        names += [f"{layer}.{n}" for n in LAYER]
    return names + ["q_w", "q_b"]  # the last block's query projection (its qkv slots hold [Wk | Wv])


def tensor_shapes(config: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Every tensor's logical shape (``[K, N]`` for GEMM weights) for ``config``."""
    w, mlp, k_patch = config["width"], config["mlp"], 3 * config["patch"] ** 2
    tokens = config["grid_h"] * config["grid_w"] + 1
    shapes: dict[str, tuple[int, ...]] = {
        "patch_w": (k_patch, w), "patch_b": (w,), "pos": (tokens, w), "ln_pre_w": (w,), "ln_pre_b": (w,),
        "ln_post_w": (w,), "ln_post_b": (w,), "proj_w": (w, config["out_dim"]), "proj_b": (config["out_dim"],),
        "q_w": (w, w), "q_b": (w,)}
    for layer in range(config["layers"]):
        last = layer == config["layers"] - 1
        qkv = 2 * w if last else 3 * w
        shapes.update({f"{layer}.ln1_w": (w,), f"{layer}.ln1_b": (w,), f"{layer}.qkv_w": (w, qkv),
                       f"{layer}.qkv_b": (qkv,), f"{layer}.out_w": (w, w), f"{layer}.out_b": (w,),
                       f"{layer}.ln2_w": (w,), f"{layer}.ln2_b": (w,), f"{layer}.fc1_w": (w, mlp),
                       f"{layer}.fc1_b": (mlp,), f"{layer}.fc2_w": (mlp, w), f"{layer}.fc2_b": (w,)})
    return shapes


def _packed(name: str, layers: int) -> bool:
    """GEMM weights are stored in panels; the last block's [Wk | Wv] row-major (the kernel never
    multiplies them as a GEMM: see ``attend_class_token`` in ``_vit.c``)."""
    return name.split(".")[-1] in PACKED and name != f"{layers - 1}.qkv_w"


def _stored_size(name: str, shape: tuple[int, ...], layers: int) -> int:
    if _packed(name, layers):
        return shape[0] * -(-shape[1] // PANEL) * PANEL
    return int(np.prod(shape))


def _layout(config: Mapping[str, int]) -> tuple[list[str], np.ndarray, int]:
    shapes = tensor_shapes(config)
    names = _slot_names(config["layers"])
    offsets, total = [], 0
    for name in names:
        offsets.append(total)
        total += -(-_stored_size(name, shapes[name], config["layers"]) // ALIGN) * ALIGN
    return names, np.asarray(offsets, np.int64), total


def check_config(config: Mapping[str, int]) -> dict[str, int]:
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ConfigError(f"ViT kernel config lacks {missing}; expected keys {list(CONFIG_KEYS)}")
    try:
        out = {k: int(config[k]) for k in CONFIG_KEYS}
    except (TypeError, ValueError):
        raise ConfigError(f"ViT kernel config values must be integers, got {dict(config)}") from None
    positive = ("layers", "width", "heads", "mlp", "grid_h", "grid_w", "patch", "out_dim")
    if any(out[k] < 1 for k in positive) or out["width"] % out["heads"] or out["act"] not in (0, 1) \
            or out["ln_pre"] not in (0, 1):
        raise ConfigError(f"invalid ViT kernel config {out}: sizes must be positive, width a multiple of heads, "
                          f"act 0 (gelu) or 1 (quick_gelu), ln_pre 0 or 1")
    return out


@dataclass
class VitWeights:
    config: dict[str, int]
    eps: float
    offsets: np.ndarray  # int64, one per slot
    weights: np.ndarray  # float32, 64-byte aligned

    @classmethod
    def from_tensors(cls, config: Mapping[str, int], eps: float, tensors: Mapping[str, np.ndarray]) -> "VitWeights":
        """Pack logical tensors (``tensor_shapes(config)``; GEMM weights as ``[K, N]``)."""
        config = check_config(config)
        names, offsets, total = _layout(config)
        shapes = tensor_shapes(config)
        weights = _aligned_empty(total)
        weights[:] = 0.0
        for name, offset in zip(names, offsets):
            if name not in tensors:
                raise ConfigError(f"ViT kernel tensor {name!r} is missing")
            value = np.asarray(tensors[name], np.float32)
            if value.shape != shapes[name]:
                raise ConfigError(f"ViT kernel tensor {name!r} has shape {value.shape}, expected {shapes[name]}")
            flat = pack_panels(value) if _packed(name, config["layers"]) else value.ravel()
            weights[offset:offset + flat.size] = flat
        return cls(config, float(eps), offsets, weights)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.weights.astype("<f4", copy=False).tofile(folder / WEIGHTS_FILE)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": self.config, "eps": self.eps,
                "floats": int(self.weights.size)}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "VitWeights":
        try:
            meta = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{folder / CONFIG_FILE} cannot be read as the ViT kernel's config: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else type(meta).__name__
            raise BundleError(f"{folder / CONFIG_FILE} is not a {FORMAT} v{FORMAT_VERSION} config (got {got})")
        eps = meta.get("eps")
        if not isinstance(meta.get("config"), dict) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise BundleError(f"{folder / CONFIG_FILE} needs a 'config' object and an 'eps' in (0, 1); "
                              f"got config {meta.get('config')!r}, eps {eps!r}")
        try:
            config = check_config(meta["config"])
        except ConfigError as exc:
            raise BundleError(f"{folder / CONFIG_FILE}: {exc}") from None
        _, offsets, total = _layout(config)
        path = folder / WEIGHTS_FILE
        size = path.stat().st_size if path.is_file() else -1
        if size != total * 4 or meta.get("floats") != total:
            raise BundleError(f"{path} holds {size} bytes; the config {config} needs {total * 4}")
        weights = _aligned_empty(total)
        with open(path, "rb") as handle:
            handle.readinto(memoryview(weights).cast("B"))
        return cls(config, float(eps), offsets, weights)


@lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    lib = load_extension(Path(__file__).parent, "_vit", "ViT kernel")
    p = ctypes.c_void_p
    lib.clipfold_vit_forward.argtypes = [p, p, p, ctypes.c_float, p, ctypes.c_int64, p, p, ctypes.c_int]
    lib.clipfold_vit_forward.restype = ctypes.c_int
    lib.clipfold_vit_workspace.argtypes = [p, ctypes.c_int64, ctypes.c_int]
    lib.clipfold_vit_workspace.restype = ctypes.c_int64
    lib.clipfold_vit_isa.restype = ctypes.c_int
    return lib


def kernel_available() -> bool:
    """Whether this CPU runs the kernel (x86-64 with AVX2 and FMA)."""
    return bool(_library().clipfold_vit_isa())


class VitTower:
    """Run :class:`VitWeights` on uint8 NCHW pixels; ``embed`` returns unit embeddings (B, out_dim).

    Calls are serialized (one workspace, and the kernel already uses ``threads`` cores)."""

    def __init__(self, weights: VitWeights, threads: int | None = None):
        if not kernel_available():
            raise ConfigError("the ViT kernel needs an x86-64 CPU with AVX2 and FMA; this one lacks them "
                              "(use the bundle's fp32 ONNX variant)")
        if threads is not None and not 1 <= threads <= MAX_THREADS:
            raise ConfigError(f"threads must be between 1 and {MAX_THREADS}, got {threads}")
        self.weights = weights
        self.threads = min(int(threads or default_threads()), MAX_THREADS)
        c = weights.config
        self.image_size = (c["grid_h"] * c["patch"], c["grid_w"] * c["patch"])
        self._config = np.asarray([c[k] for k in CONFIG_KEYS], np.int64)
        self._workspace = np.empty(0, np.float32)
        self._lock = threading.Lock()

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        expected = (3, *self.image_size)
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 4 \
                or pixels.shape[1:] != expected:
            got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
            raise ConfigError(f"pixels must be uint8 (batch, {', '.join(map(str, expected))}); got {got}")
        pixels = np.ascontiguousarray(pixels)
        batch = len(pixels)
        out = np.empty((batch, self.weights.config["out_dim"]), np.float32)
        if batch == 0:
            return out
        lib = _library()
        with self._lock:
            need = lib.clipfold_vit_workspace(self._config.ctypes.data, batch, self.threads)
            if self._workspace.size < need:
                self._workspace = _aligned_empty(int(need))
            status = lib.clipfold_vit_forward(self._config.ctypes.data, self.weights.offsets.ctypes.data,
                                              self.weights.weights.ctypes.data, self.weights.eps, pixels.ctypes.data,
                                              batch, self._workspace.ctypes.data, out.ctypes.data, self.threads)
        if status == -2:
            raise ConfigError(f"the ViT kernel could not start {self.threads} threads; give fewer (threads=...)")
        if status != 0:
            raise ConfigError("the ViT kernel needs an x86-64 CPU with AVX2 and FMA")
        norm = np.sqrt(np.einsum("ij,ij->i", out.astype(np.float64), out.astype(np.float64)))
        return (out / np.maximum(norm, 1e-12)[:, None]).astype(np.float32)
