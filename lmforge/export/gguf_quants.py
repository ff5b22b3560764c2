"""GGUF tensor types: which type each tensor gets, and the Q4_K/Q6_K block quantisers.

gguf-py (the ``gguf`` package) quantises F16, BF16, Q8_0, Q4_0/1 and Q5_0/1 but only *de*quantises
the K-quants, so Q4_K and Q6_K (needed for ``q4_k_m``) are written here with numpy. The block
layouts are ggml's (``block_q4_K``: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of
4-bit quants; ``block_q6_K``: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, f16
d). The scales are picked by a plain min/max rule rather than llama.cpp's iterative search, so the
error is a little larger than llama-quantize's for the same file size; the tests check these bytes
against gguf-py's own dequantiser and transformers' GGUF loader, which share no code with this file.
"""
from __future__ import annotations

import numpy as np

QK_K = 256  # elements in a K-quant super-block

# --quant_type -> the type most 2-D weights get, and llama.cpp's file_type number for the header.
QUANT_TYPES = ("f16", "bf16", "q8_0", "q4_k_m")


def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` rounded to float16 (what a reader will see) and as float32 for the arithmetic."""
    h = x.astype(np.float16)
    return h, h.astype(np.float32)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """float rows (``cols % 256 == 0``) -> uint8 rows of 144-byte Q4_K blocks; x ~ d*sc*q - dmin*m."""
    shape = rows.shape
    x = rows.astype(np.float32).reshape(-1, 8, 32)  # blocks of 8 sub-blocks of 32
    n = x.shape[0]
    low = np.minimum(x.min(-1), 0.0)  # ggml's offsets are >= 0: value = scale*q - offset
    scale = (x.max(-1) - low) / 15.0
    offset = -low
    d16, d = _f16(scale.max(-1, keepdims=True) / 63.0)
    dmin16, dmin = _f16(offset.max(-1, keepdims=True) / 63.0)
    sc = np.clip(np.rint(_div(scale, d)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_div(offset, dmin)), 0, 63).astype(np.uint8)
    eff_scale = (d * sc)[..., None]
    eff_min = (dmin * mn)[..., None]
    q = np.clip(np.rint(_div(x + eff_min, eff_scale)), 0, 15).astype(np.uint8)
    scales = np.concatenate([
        (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
        (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4),
    ], axis=1)
    q = q.reshape(n, 4, 2, 32)  # sub-blocks 2k and 2k+1 share 32 bytes: low and high nibble
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    blocks = np.concatenate([d16.view(np.uint8), dmin16.view(np.uint8), scales, qs], axis=1)
    return blocks.reshape(*shape[:-1], shape[-1] // QK_K * 144)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """float rows (``cols % 256 == 0``) -> uint8 rows of 210-byte Q6_K blocks; x ~ d*sc*(q-32)."""
    shape = rows.shape
    x = rows.astype(np.float32).reshape(-1, 16, 16)  # blocks of 16 sub-blocks of 16
    n = x.shape[0]
    scale = np.abs(x).max(-1) / 31.0
    d16, d = _f16(scale.max(-1, keepdims=True) / 127.0)
    sc = np.clip(np.rint(_div(scale, d)), -128, 127).astype(np.int8)
    eff = (d * sc.astype(np.float32))[..., None]
    q = (np.clip(np.rint(_div(x, eff)), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)
    lo, hi = (q & 15).reshape(n, 2, 2, 64), (q >> 4).reshape(n, 2, 4, 32)
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8)], axis=1)
    return blocks.reshape(*shape[:-1], shape[-1] // QK_K * 210)


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's Q4_K_M rule: the first and last eighth of the layers and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant_type: str, n_layers: int, has_output: bool):
    """The GGML type for one tensor (``name`` is its GGUF name, e.g. ``blk.3.attn_v.weight``).

    1-D tensors (norms, biases) stay F32 as llama.cpp keeps them. ``q4_k_m`` follows llama.cpp's
    recipe: Q6_K for the output matrix (the embeddings when they are tied) and for ``attn_v`` /
    ``ffn_down`` in the layers ``_use_more_bits`` picks, Q4_K elsewhere; a row length that is not a
    multiple of 256 falls back to Q5_0 (for Q4_K) or Q8_0 (for Q6_K), as llama-quantize does.
    """
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2:
        return T.F32
    cols = shape[-1]
    if quant_type == "f16":
        return T.F16
    if quant_type == "bf16":
        return T.BF16
    if quant_type == "q8_0":
        return T.Q8_0 if cols % 32 == 0 else T.F16
    if quant_type != "q4_k_m":
        raise ValueError(f"--quant_type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
    want = T.Q4_K
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        want = T.Q6_K
    elif name.endswith((".attn_v.weight", ".ffn_down.weight")):
        layer = int(name.split(".")[1])
        if _use_more_bits(layer, n_layers):
            want = T.Q6_K
    if cols % QK_K:
        want = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}[want]
    return want if cols % 32 == 0 else T.F16


def file_type(quant_type: str) -> int:
    """``general.file_type``: llama.cpp's LlamaFileType for the whole file."""
    from gguf import LlamaFileType as F

    return {"f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0, "q4_k_m": F.MOSTLY_Q4_K_M}[quant_type]


def quantize_tensor(data: np.ndarray, qtype) -> np.ndarray:
    """``data`` (float32) in ``qtype``: gguf-py's quantisers, and ours for Q4_K/Q6_K."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype == T.Q4_K:
        return quantize_q4_k(data)
    if qtype == T.Q6_K:
        return quantize_q6_k(data)
    return quants.quantize(data, qtype)
