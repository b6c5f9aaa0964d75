"""ConfLayers' layer scores and adaptive threshold (arXiv 2604.14612; reference code WA225/ConfLayers).

Pure numpy functions on per-layer arrays, so each step can be checked on hand-worked inputs:
    confidence(h)      = 1 - H(softmax(h over the hidden dimension)) / log(hidden), token-averaged
    layer score s_i    = confidence(attention output) + confidence(MLP output), layers 1..L-2
    skip layer i       when s_i < mean(neighbours) - lambda * std(neighbours), where the
                       neighbourhood width grows with the (normalised) curvature of s.
The torch part (hooks that collect block outputs) is :func:`profile_layers`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The reference clamps block outputs to [log(smallest float32), 88.7] before the softmax entropy
# (88.7 ~ log(largest float32): exp cannot overflow). Only the published search applies it, so
# the cost-aware search keeps its sets on models with massive activations.
CLAMP = (float(np.log(np.finfo(np.float32).tiny)), 88.7)


def block_confidence(outputs: np.ndarray, clamp: bool = False) -> float:
    """outputs [tokens, hidden] -> 1 - mean token entropy of softmax over hidden / log(hidden)."""
    z = outputs.astype(np.float64)
    if clamp:
        z = np.clip(z, *CLAMP)
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    entropy = -(p * np.log(p + 1e-12)).sum(axis=-1)  # [tokens]
    return float(1.0 - entropy.mean() / np.log(outputs.shape[-1]))


def z_normalise(scores: np.ndarray) -> np.ndarray:
    return (scores - scores.mean()) / (scores.std() + 1e-6)


def leading_run(values: np.ndarray) -> int:
    """Length of the run of values equal to the first one, at the start of the array."""
    different = np.nonzero(values != values[0])[0]
    return int(different[0]) if different.size else len(values)


def mean_half(x: np.ndarray) -> np.ndarray:
    """Affine map of x (already in [0, 1]) whose mean is 0.5, as wide as fits, clipped to [0, 1]."""
    mu, lo, hi = x.mean(), x.min(), x.max()
    if np.isclose(lo, hi):
        return np.full_like(x, 0.5)
    scale = min(0.5 / (hi - mu), 0.5 / (mu - lo))
    return np.clip(scale * (x - mu) + 0.5, 0.0, 1.0)


def curvature_weights(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """(g in [0, 1] with mean 0.5 from the second difference of the scores, its leading-run length)."""
    second = np.gradient(np.gradient(scores))
    run = leading_run(second)
    spread = second.max() - second.min()
    return mean_half((second - second.min()) / (spread + 1e-8)), run


def window_sizes(g: np.ndarray, run: int, num_layers: int, cap_window: bool = False) -> np.ndarray:
    """w_i = 2 + int(alpha * g_i * (i + 1) / L), alpha = 5 * run (``cap_window``: at most L // 3, as
    the reference does for Qwen models: Architecture.caps_confidence_window)."""
    alpha = min(num_layers // 3, 5 * run) if cap_window else 5 * run
    return np.array([2 + int(alpha * gi * position / num_layers) for position, gi in enumerate(g, start=1)])


def select_skips(
    scores: Sequence[float], num_layers: int, lam: float, cap_window: bool = False
) -> dict[str, np.ndarray]:
    """Apply the adaptive threshold to the scores of layers 1..L-2 (in order).

    Returns the skipped layer indices and the intermediate arrays (for the report's plot).
    """
    s = z_normalise(np.asarray(scores, dtype=np.float64))
    g, run = curvature_weights(s)
    windows = window_sizes(g, run, num_layers, cap_window)
    thresholds = np.empty_like(s)
    for i, w in enumerate(windows):
        half = int(w) // 2
        neighbours = np.concatenate([s[max(0, i - half) : i], s[i + 1 : i + half + 1]])
        mean, std = (neighbours.mean(), neighbours.std()) if neighbours.size else (0.0, 0.0)
        thresholds[i] = mean - lam * std
    skip = np.nonzero(s < thresholds)[0] + 1  # eligible position i is decoder layer i + 1
    return {"skip": skip, "scores": s, "thresholds": thresholds, "windows": windows, "curvature": g}


def select_at_least(
    scores: Sequence[float],
    num_layers: int,
    lam: float,
    min_size: int,
    cap_window: bool = False,
    step: float = 0.05,
    max_steps: int = 40,
) -> tuple[dict[str, np.ndarray], float, int]:
    """The reference's minimum size: a set smaller than ``min_size`` is never evaluated; selection
    repeats at once with lambda one step lower (a higher threshold skips more) until it is big
    enough, at most ``max_steps`` times. Returns (selection, lambda used, steps taken)."""
    chosen = select_skips(scores, num_layers, lam, cap_window)
    steps = 0
    while len(chosen["skip"]) < min_size and steps < max_steps:
        steps += 1
        lam -= step
        chosen = select_skips(scores, num_layers, lam, cap_window)
    return chosen, lam, steps


def adapt_lambda(lam: float, skipped: int, eligible: int, target_ratio: float, step: float = 0.05) -> float:
    """Move lambda toward the target skip ratio: raise it when far too many layers are skipped."""
    ratio = skipped / eligible
    if ratio > target_ratio + 0.25:
        return lam + step
    if ratio < target_ratio:
        return lam - step
    return lam


def profile_blocks(
    model, architecture, token_ids: Sequence[int], window: int, clamp: bool = False
) -> np.ndarray:
    """Confidences [layers 1..L-2, (attention, MLP)] from one full-model pass over ``token_ids``
    (a prompt and the text the model generated for it), of the raw attention and MLP block
    outputs of the last ``window`` tokens (which attend to everything before them)."""
    import torch

    layers = architecture.decoder_layers(model)
    eligible = range(1, len(layers) - 1)
    captured: dict[tuple[int, str], np.ndarray] = {}

    def hook(key):
        def store(_module, _inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            captured[key] = tensor[0, -window:].detach().float().cpu().numpy()  # [window, hidden]

        return store

    handles = []
    for i in eligible:
        attention, mlp = architecture.blocks(layers[i])
        handles.append(attention.register_forward_hook(hook((i, "attn"))))
        handles.append(mlp.register_forward_hook(hook((i, "mlp"))))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([list(token_ids)], device=model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return np.array(
        [[block_confidence(captured[(i, block)], clamp) for block in ("attn", "mlp")] for i in eligible]
    )


def profile_layers(
    model, architecture, token_ids: Sequence[int], window: int, clamp: bool = False
) -> np.ndarray:
    """Layer scores s_i = confidence(attention output) + confidence(MLP output), layers 1..L-2."""
    return profile_blocks(model, architecture, token_ids, window, clamp).sum(axis=1)


def ranked_blocks(block_scores: np.ndarray, k: int) -> list[int | str]:
    """The ``k`` least confident blocks of layers 1..L-2 as a skip set, from confidences [layers,
    (attention, MLP)]: each block type z-normalised on its own (their scales differ), both blocks
    of a layer written as the layer (conflayers_runtime.manifest.SkipPlan)."""
    z = np.stack([z_normalise(block_scores[:, b]) for b in range(2)], axis=1)
    order = np.argsort(z, axis=None, kind="stable")[:k]
    chosen: dict[int, list[str]] = {}
    for flat in order:
        layer, block = divmod(int(flat), 2)
        chosen.setdefault(layer + 1, []).append(("attention", "mlp")[block])  # eligible i is layer i + 1
    units: list[int | str] = []
    for layer, blocks in sorted(chosen.items()):
        units += [layer] if len(blocks) == 2 else [f"{layer}.{blocks[0]}"]
    return units
