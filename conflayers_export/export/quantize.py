"""Block-wise weight quantization in the layout of ONNX Runtime's MatMulNBits (com.microsoft).

A linear weight W [N, K] (the Hugging Face [out, in] layout, which is MatMulNBits' own) is cut
into blocks of BLOCK_SIZE along K; each block gets one scale, and values are rounded to signed
``bits``-bit integers stored with the operator's default zero point 2^(bits-1) (symmetric, so no
zero-point tensor is written). MatMulNBits computes Y = A @ dequantize(W)^T with

    dequantize(W)[n, k] = (q[n, k] - 2^(bits-1)) * scale[n, k // BLOCK_SIZE]

and 4-bit values packed two per byte, the even k in the low nibble. The same ``dequantize``
gives the PyTorch reference its weights, so parity checks compare like with like.
"""

from __future__ import annotations

from copy import deepcopy

import numpy as np
import torch

BLOCK_SIZE = 32
BITS = {"int8": 8, "int4": 4}
# MatMulNBits' accuracy_level on CPU (CUDA ignores it). 4: activations are rounded to int8 per
# block and multiplied with integer dot products, 1.3x (one token) to 2.2x (five tokens) faster
# than 0 (float math) here. But that rounding turns the ~1e-7 differences between a one-token
# step and a multi-token verify pass (attention summation order) into logit jumps of ~0.05, which
# flip greedy choices at near-ties: speculative output would drift from plain decoding. So graphs
# that decide the output (the full graph) compute in float; drafts, which only propose, take the
# fast path.
FULL_ACCURACY_LEVEL = 0
DRAFT_ACCURACY_LEVEL = 4


def quantize(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """W [N, K] float -> (packed uint8 [N, blocks, BLOCK_SIZE * bits // 8], scales float32 [N, blocks])."""
    n, k = weight.shape
    blocks = -(-k // BLOCK_SIZE)
    padded = np.zeros((n, blocks * BLOCK_SIZE), np.float32)
    padded[:, :k] = weight
    grouped = padded.reshape(n, blocks, BLOCK_SIZE)
    top = 2 ** (bits - 1) - 1  # 7 or 127: the symmetric range, so -max and +max round alike
    scales = np.abs(grouped).max(axis=-1) / top
    scales[scales == 0] = 1.0  # an all-zero block: any scale reproduces it
    q = np.clip(np.rint(grouped / scales[..., None]), -top - 1, top).astype(np.int16) + (top + 1)
    q = q.astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(q), scales.astype(np.float32)


def dequantize(packed: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The float weight [N, K] that MatMulNBits multiplies by (inverse of :func:`quantize`)."""
    if bits == 4:
        values = np.empty((*packed.shape[:2], packed.shape[2] * 2), np.uint8)
        values[..., 0::2] = packed & 0x0F
        values[..., 1::2] = packed >> 4
    else:
        values = packed
    centred = values.astype(np.float32) - 2 ** (bits - 1)
    weight = centred * scales[..., None].astype(np.float32)
    return weight.reshape(weight.shape[0], -1)[:, :k]


def round_trip(weight: np.ndarray, bits: int) -> np.ndarray:
    """What a quantized graph computes with in place of ``weight``."""
    packed, scales = quantize(weight, bits)
    return dequantize(packed, scales, bits, weight.shape[1])


def quantized_copy(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """The PyTorch model a ``bits``-bit graph computes: a copy whose decoder linears and output
    head hold :func:`round_trip` weights (embeddings and norms stay float, as in the graphs).
    Quantizing rows independently makes this equal to the graphs' fused QKV / gate-up tensors."""
    copy = deepcopy(model)
    with torch.no_grad():
        for module in copy.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.from_numpy(round_trip(module.weight.float().numpy(), bits)))
        head = round_trip(copy.lm_head.weight.float().numpy(), bits)
        copy.lm_head.weight = torch.nn.Parameter(torch.from_numpy(head))  # unties it from the embeddings
    return copy.eval()
