"""Architecture adapters: small declarative descriptions of each supported decoder family.

An adapter says where the decoder layers live, which submodules are the attention and MLP blocks
(whose raw outputs ConfLayers scores), how a layer is bypassed, and the KV-cache layout the
export needs. Adding an architecture = one ``register(Architecture(...))`` call with a tiny
random config; a guard test fails if a registered adapter is not exercised by the test suite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from conflayers_runtime.manifest import SkipPlan
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import UnsupportedArchitectureError

# Tiny random configs share these sizes: big enough to have GQA (4 query heads over 2 KV heads)
# and several layers to skip, small enough that a forward pass takes about a millisecond.
_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    # Larger than the usual 0.02 so random logits are peaked: greedy parity then tests real
    # decisions instead of near-ties, and drafts differ enough from the full model to be rejected.
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class KVLayout:
    """Per-layer KV-cache shape: [batch, num_kv_heads, seq, head_dim] for every layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention


@dataclass(frozen=True)
class Architecture:
    model_type: str  # transformers' config.model_type
    tiny_config: Callable[[], PretrainedConfig]
    layers_path: str = "model.layers"  # attribute path from the CausalLM to the decoder layers
    attention_name: str = "self_attn"  # block whose output is added to the residual stream
    mlp_name: str = "mlp"
    # How the graph builder reads a layer (defaults: Llama). See export/graph.py.
    fused_qkv: str | None = None  # one [q; k; v] projection under this name (phi3), else q/k/v_proj
    fused_gate_up: str | None = None  # one [gate; up] projection under this name (phi3)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (qwen3, gemma3)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight); gemma stores weight - 1
    sandwich_norms: bool = False  # extra norms on the attention and MLP outputs (gemma3)
    rope_per_layer_type: bool = False  # sliding and full layers use different RoPE tables (gemma3)
    # ConfLayers' window width factor capped at L // 3, as the reference code does for Qwen models
    caps_confidence_window: bool = False

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for part in self.layers_path.split("."):
            module = getattr(module, part)
        return module  # type: ignore[return-value]

    def blocks(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(attention block, MLP block) of one decoder layer."""
        return getattr(layer, self.attention_name), getattr(layer, self.mlp_name)

    def kv_layout(self, config: PretrainedConfig) -> KVLayout:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        n = config.num_hidden_layers
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * n
        window = getattr(config, "sliding_window", None)
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return KVLayout(n, kv_heads, head_dim, windows)


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder layer: the residual stream passes through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


class _ZeroBlock(nn.Module):
    """Stands in for a skipped attention or MLP block: it adds nothing to the residual stream (a
    zero output stays zero through a sandwich norm). An attention block returns (output, weights)."""

    def __init__(self, attention: bool):
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> object:
        zero = torch.zeros_like(hidden_states)
        return (zero, None) if self.attention else zero


@contextlib.contextmanager
def bypassed(model: PreTrainedModel, architecture: Architecture, skip: Iterable[int | str]) -> Iterator[None]:
    """Run ``model`` with the ``skip`` set bypassed (whole layers, and "<layer>.attention" /
    "<layer>.mlp" blocks: conflayers_runtime.manifest.SkipPlan), then restore it.

    Modules are replaced in place, so kept layers keep their index and their slot in the KV cache.
    """
    plan = SkipPlan.of(list(skip))
    layers = architecture.decoder_layers(model)
    saved_layers = {i: layers[i] for i in plan.layers}
    names = {"attention": architecture.attention_name, "mlp": architecture.mlp_name}
    saved_blocks = {
        (i, names[block]): getattr(layers[i], names[block])
        for block, indices in (("attention", plan.attention), ("mlp", plan.mlp))
        for i in indices
    }
    try:
        for i in saved_layers:
            layers[i] = _PassThrough()
        for i, name in saved_blocks:
            setattr(layers[i], name, _ZeroBlock(attention=name == names["attention"]))
        yield
    finally:
        for i, layer in saved_layers.items():
            layers[i] = layer
        for (i, name), block in saved_blocks.items():
            setattr(layers[i], name, block)


_REGISTRY: dict[str, Architecture] = {}


def register(architecture: Architecture) -> Architecture:
    _REGISTRY[architecture.model_type] = architecture
    return architecture


def registered() -> dict[str, Architecture]:
    return dict(_REGISTRY)


def get_architecture(model_type: str) -> Architecture:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        supported = ", ".join(sorted(_REGISTRY))
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported (supported: {supported}); "
            "see DESIGN.md, 'Adding an architecture'"
        ) from None


def _tiny(config_class_name: str, **overrides: object) -> Callable[[], PretrainedConfig]:
    def build() -> PretrainedConfig:
        import transformers

        return getattr(transformers, config_class_name)(**{**_TINY, **overrides})

    return build


register(Architecture("llama", _tiny("LlamaConfig")))
register(Architecture("mistral", _tiny("MistralConfig", sliding_window=None)))
register(Architecture("qwen2", _tiny("Qwen2Config"), caps_confidence_window=True))
register(Architecture("qwen3", _tiny("Qwen3Config", head_dim=16), qk_norm=True, caps_confidence_window=True))
register(Architecture("phi3", _tiny("Phi3Config"), fused_qkv="qkv_proj", fused_gate_up="gate_up_proj"))
register(
    Architecture(
        "gemma3_text",
        _tiny(
            "Gemma3TextConfig",
            head_dim=16,
            query_pre_attn_scalar=16,
            # A window shorter than the test sequences, so the sliding layers really slide.
            sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        ),
        qk_norm=True,
        norm_offset=1.0,
        sandwich_norms=True,
        rope_per_layer_type=True,
    )
)
