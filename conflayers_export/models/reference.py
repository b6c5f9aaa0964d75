"""PyTorch reference for self-speculative decoding: the oracle the ONNX runtime is tested against,
and the engine ``calibrate`` scores skip sets with.

:class:`TorchBackend` implements the runtime's :class:`~conflayers_runtime.Backend` over a
transformers model, so the decoding loop itself (drafting, verification, acceptance) is the very
code the runtime uses. The draft is the same model with the skipped layers bypassed; it reads
and writes the full model's KV cache for the layers it runs. Rollback is by length: cache layers
longer than the position of the next call are cropped (a view, no copy of the cache).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence

import numpy as np
import torch
from conflayers_runtime import DraftConfig, GenerationStats, SamplingConfig, check_skip_layers
from conflayers_runtime import generate as run_generation
from conflayers_runtime.speculative import DEFAULT_DRAFT_CONFIG, GREEDY
from transformers import DynamicCache, PreTrainedModel

from .architectures import Architecture, bypassed


class TorchBackend:
    """Full model and layer-skipped draft over one shared ``DynamicCache``."""

    def __init__(
        self,
        model: PreTrainedModel,
        architecture: Architecture,
        skip_layers: Sequence[int | str] = (),
        draft_model: PreTrainedModel | None = None,
        draft_token_ids: np.ndarray | None = None,
    ):
        """``draft_model``: another model over the same cache for the draft (e.g. with quantized
        weights; default ``model``); ``draft_token_ids``: the draft's pruned vocabulary."""
        check_skip_layers(list(skip_layers), model.config.num_hidden_layers)
        self.model = model
        self.draft_model = draft_model if draft_model is not None else model
        self.architecture = architecture
        self.skip_layers = tuple(skip_layers)
        self.draft_token_ids = draft_token_ids
        self.cache_argument = _cache_argument(model)  # both models are of the same class
        # No config: every layer is a plain growing layer that can be cropped. Sliding-window
        # layers still attend only inside their window, because the attention masks apply it.
        self.cache = DynamicCache()

    def reset(self) -> None:
        self.cache = DynamicCache()

    @torch.inference_mode()
    def forward(self, token_ids: Sequence[int], start: int, use_draft: bool) -> np.ndarray:
        self._truncate(start)
        device = self.model.device  # the first device of a model spread with a device_map
        positions = torch.arange(start, start + len(token_ids), device=device).unsqueeze(0)  # [1, S]
        model = self.draft_model if use_draft else self.model
        skip = self.skip_layers if use_draft else ()
        context = bypassed(model, self.architecture, skip) if skip else contextlib.nullcontext()
        with context:
            out = model(
                input_ids=torch.tensor([list(token_ids)], device=device),
                position_ids=positions,
                use_cache=True,
                **{self.cache_argument: self.cache},
            )
        logits = out.logits[0].float().cpu().numpy()  # [S, V]
        return logits[:, self.draft_token_ids] if use_draft and self.draft_token_ids is not None else logits

    def _truncate(self, length: int) -> None:
        if length == 0:
            self.reset()
            return
        for layer in self.cache.layers:
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)


def _cache_argument(model: PreTrainedModel) -> str:
    """The name under which this transformers version's forward takes the KV cache: ``cache`` in
    recent 5.x releases, ``past_key_values`` before. A wrong name would be swallowed by **kwargs
    and every step would run without its context (seen with 5.17 on the GPU machine)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def speculative_generate(
    model: PreTrainedModel,
    architecture: Architecture,
    prompt_ids: Sequence[int],
    skip_layers: Sequence[int | str],
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    draft_config: DraftConfig | None = DEFAULT_DRAFT_CONFIG,
    stop_token_ids: Sequence[int] = (),
) -> tuple[list[int], GenerationStats]:
    """Self-speculative generation with ``skip_layers`` bypassed in the draft (``draft_config=None``:
    plain)."""
    backend = TorchBackend(model, architecture, skip_layers)
    return run_generation(backend, prompt_ids, max_new_tokens, sampling, draft_config, stop_token_ids)
