"""Block-wise weight quantization in the layout of ONNX Runtime's MatMulNBits (com.microsoft).

A linear weight W [N, K] (the Hugging Face [out, in] layout, which is MatMulNBits' own) is cut
into blocks of BLOCK_SIZE along K; each block gets a scale and a zero point (asymmetric
round-to-nearest: the block's [min, max] spans the 2^bits levels). MatMulNBits computes
Y = A @ dequantize(W)^T with

    dequantize(W)[n, k] = (q[n, k] - zero_point[n, k // BLOCK_SIZE]) * scale[n, k // BLOCK_SIZE]

4-bit values (and 4-bit zero points) packed two per byte, the even index in the low nibble. The
same ``dequantize`` gives the PyTorch reference its weights, so parity checks compare like with like.
"""

from __future__ import annotations

from copy import deepcopy

import numpy as np
import torch

BLOCK_SIZE = 32
BITS = {"int8": 8, "int4": 4}
# MatMulNBits' accuracy_level on CPU (CUDA ignores it), for every graph. 4: activations are rounded
# to int8 per block and multiplied with integer dot products, 1.3x (one token) to 2.2x (five tokens)
# faster than 0 (float math) here, and what onnxruntime-genai's CPU int4 models use. It computes a
# row alike for any row count; the int8 rounding magnifies the last-bit differences of a one-row
# attention pass, which the graph's attention padding removes (DESIGN.md, "Row invariance"). Each
# row beyond the first costs ~0.4 of a one-row step on SmolLM2 (docs/BENCHMARKS.md).
ACCURACY_LEVEL = 4


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs along the last axis (padded to even length) -> one byte each, even index low."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def _unpack_nibbles(packed: np.ndarray, length: int) -> np.ndarray:
    values = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    values[..., 0::2] = packed & 0x0F
    values[..., 1::2] = packed >> 4
    return values[..., :length]


def quantize(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [N, K] float -> (packed uint8 [N, blocks, BLOCK_SIZE * bits // 8], scales float32 [N * blocks],
    zero points uint8: [N * blocks] for 8 bits, [N * ceil(blocks / 2)] packed for 4 bits)."""
    n, k = weight.shape
    blocks = -(-k // BLOCK_SIZE)
    padded = np.zeros((n, blocks * BLOCK_SIZE), np.float32)
    padded[:, :k] = weight
    grouped = padded.reshape(n, blocks, BLOCK_SIZE)
    levels = 2**bits - 1
    low = np.minimum(grouped.min(axis=-1), 0.0)  # the range holds 0, so zero stays exact
    high = np.maximum(grouped.max(axis=-1), 0.0)
    scales = (high - low) / levels
    scales[scales == 0] = 1.0  # an all-zero block: any scale reproduces it
    zero = np.clip(np.rint(-low / scales), 0, levels)
    q = np.clip(np.rint(grouped / scales[..., None]) + zero[..., None], 0, levels).astype(np.uint8)
    zero = zero.astype(np.uint8)
    if bits == 4:
        q, zero = _pack_nibbles(q), _pack_nibbles(zero)
    return np.ascontiguousarray(q), scales.astype(np.float32).reshape(-1), zero.reshape(-1)


def dequantize(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, k: int
) -> np.ndarray:
    """The float weight [N, K] that MatMulNBits multiplies by (inverse of :func:`quantize`)."""
    n, blocks = packed.shape[:2]
    if bits == 4:
        values = _unpack_nibbles(packed, BLOCK_SIZE)
        zero = _unpack_nibbles(zero_points.reshape(n, -1), blocks)
    else:
        values, zero = packed, zero_points.reshape(n, blocks)
    centred = values.astype(np.float32) - zero[..., None].astype(np.float32)
    weight = centred * scales.reshape(n, blocks, 1).astype(np.float32)
    return weight.reshape(n, -1)[:, :k]


def round_trip(weight: np.ndarray, bits: int) -> np.ndarray:
    """What a quantized graph computes with in place of ``weight``."""
    return dequantize(*quantize(weight, bits), bits, weight.shape[1])


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """What MatMulNBits at ACCURACY_LEVEL 4 multiplies on the CPU in place of ``x`` [..., K]: each
    block of BLOCK_SIZE values along K rounded to int8 with the symmetric scale max|block| / 127
    (round half to even), then scaled back."""
    k = x.shape[-1]
    blocks = torch.nn.functional.pad(x, (0, -k % BLOCK_SIZE)).unflatten(-1, (-1, BLOCK_SIZE))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero block stays zero
    rounded = torch.clamp(torch.round(blocks / scale), -127, 127) * scale
    return rounded.flatten(-2)[..., :k]


def quantized_copy(model: torch.nn.Module, bits: int, int8_activations: bool = False) -> torch.nn.Module:
    """The PyTorch model a ``bits``-bit graph computes: a copy whose decoder linears and output
    head hold :func:`round_trip` weights (embeddings and norms stay float, as in the graphs).
    Quantizing rows independently makes this equal to the graphs' fused QKV / gate-up tensors.
    ``int8_activations``: those linears also round their inputs as the CPU kernel does
    (:func:`round_activations`), so that the copy computes what the graph computes on the CPU."""
    replaced = {id(m.weight) for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)}
    # Everything else (embeddings, norms, biases, the head before it is replaced) is shared, not
    # copied: the copy costs only the decoder linears' memory.
    shared = {id(p): p for p in model.parameters() if id(p) not in replaced}
    copy = deepcopy(model, shared)
    with torch.no_grad():
        for module in copy.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.from_numpy(round_trip(module.weight.float().numpy(), bits)))
        head = round_trip(copy.lm_head.weight.float().numpy(), bits)
        copy.lm_head.weight = torch.nn.Parameter(torch.from_numpy(head))  # unties it from the embeddings
    if int8_activations:
        for module in [*copy.model.layers.modules(), copy.lm_head]:
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(lambda _, args: (round_activations(args[0]), *args[1:]))
    return copy.eval()
