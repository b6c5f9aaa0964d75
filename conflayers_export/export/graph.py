"""ONNX graph builder: one code path writes the full model and every layer-skipped draft.

The graph is built directly from the model's weights (onnxruntime-genai style), not traced:
- one GroupQueryAttention (com.microsoft) per layer with RoPE inside (do_rotary) and the KV
  cache of max_seq_len positions bound as both past and present, so a runtime keeps one buffer
  per layer and rolls back by passing a shorter attention mask;
- one fused QKV MatMul per layer, residual adds fused into SkipSimplifiedLayerNormalization;
- a tied output head reads the embedding table through Gemm(transB=1), so it is stored once.

Cheaper drafts (and int4 artifacts) come from the same builder:
- ``bits`` (4 or 8): every decoder linear and the output head read MatMulNBits copies of their
  weights (quantize.py), stored once beside the float weights and shared by every graph that
  reads them; norms, embeddings (a Gather of one row per token) and RoPE tables stay float;
- ``vocab_ids``: the output head covers only those token ids (a pruned copy of its rows), so
  the graph's logits have len(vocab_ids) columns, column j scoring token vocab_ids[j].

A draft is the same builder with some layers left out: its KV inputs are only those of the
layers it keeps (same names as in the full graph), and its initializers are a subset of the
full graph's, by name. Graph I/O (batch B, new tokens S, total length T):
    input_ids [B, S] int64, attention_mask [B, T] int64 (ones; T = cached + S),
    past_key_values.{i}.key/value [B, kv_heads, max_seq_len, head_dim]
 -> logits [B, S, vocab] float32, present.{i}.key/value (same buffers as past),
    next_token_ids [B, S] int64 (each row's argmax, as a token id also for a pruned draft), and in
    drafts top_probability [B, S] float32 (the largest softmax probability: the draft's stop rule).
The last two are the greedy token choice on the device: a runtime decoding greedily reads them
instead of logits rows (on CUDA the logits then never cross the bus).

A *capturable* graph (``capturable=True``, docs/gpu/CUDA_GRAPHS.md) takes ``seqlens_k`` [B] int32
(the valid cache length after the pass, minus one, attention padding rows included) instead of the
attention mask, and a constant total length of max_seq_len: its inputs keep their shapes and
addresses from one decode step to the next, so ONNX Runtime can capture the pass in a CUDA graph
and replay it with the lengths updated in place. Its only host-side nodes read shapes, which are
fixed per captured pass.

A *tree* graph (``tree=True``, the full model: ``tree.full.onnx``) also takes ``position_ids``
[B, S] int64 (each row's position, for RoPE) and ``attention_bias`` [B, 1, S, T] in the activation
dtype (added to every head's scores; a large negative value hides a key): a verify pass can then
hold a token tree, nodes that branch off the drafted chain attending only to their ancestors
(docs/TOKEN_TREES.md). With positions start..start+S-1 and a zero bias it computes every row
bitwise as the mask graph does. A capturable tree graph (both flags) takes the bias with
max_seq_len columns, so that its shape too is fixed per row count.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np
import onnx
import torch
from conflayers_runtime.manifest import ARTIFACT_DTYPES
from conflayers_runtime.tree import TREE_INPUTS
from onnx import TensorProto, helper, numpy_helper

from ..models.architectures import Architecture
from .quantize import ACCURACY_LEVEL, BLOCK_SIZE, quantize
from .weights import WeightStore

OPSET = 21
# An artifact dtype's activations (ARTIFACT_DTYPES, the runtime's list) -> numpy and ONNX types.
_FLOATS: dict[str, tuple[type, int]] = {
    "fp32": (np.float32, TensorProto.FLOAT),
    "fp16": (np.float16, TensorProto.FLOAT16),
}


# A one-token pass runs its attention over its row repeated (pad_attention_rows), in CPU artifacts.
MIN_ATTENTION_ROWS = 2


def min_attention_rows(dtype: str) -> int:
    """Rows a pass's attention runs over at least. CPU artifacts (fp32 activations) pad a one-token
    pass to MIN_ATTENTION_ROWS in the graph, so that every pass computes its rows alike (row
    invariance, DESIGN.md). CUDA artifacts (fp16) need no such padding in the graph: there the
    runtime gives every exact pass after the prompt one row count (artifact.full_pass_rows),
    and the padding would only add two kernels per layer to every pass."""
    return MIN_ATTENTION_ROWS if ARTIFACT_DTYPES[dtype].activations == "fp32" else 1


def host_array(tensor: torch.Tensor) -> np.ndarray:
    """A float32 copy of an in-memory parameter (a streamed model reads its files instead:
    models.loader.LoadedModel.array)."""
    return tensor.detach().float().numpy()


class _GraphBuilder:
    def __init__(
        self,
        model: torch.nn.Module,
        architecture: Architecture,
        dtype: str,
        max_seq_len: int,
        weights: WeightStore,
        bits: int | None = None,
        vocab_ids: np.ndarray | None = None,
        confidence: bool = False,
        capturable: bool = False,
        read: Callable[[torch.Tensor], np.ndarray] = host_array,
        tree: bool = False,
    ):
        self.model = model
        self.read = read  # a parameter's values as a float32 array
        self.arch = architecture
        self.config = model.config
        self.np_dtype, self.onnx_dtype = _FLOATS[ARTIFACT_DTYPES[dtype].activations]
        # Only full graphs pay for the attention padding: a draft's numerics only choose what it
        # proposes, so its rows need not be invariant (6% of a SmolLM2 int8 draft pass, measured).
        self.min_attention_rows = 1 if confidence else min_attention_rows(dtype)
        self.bits = bits
        self.vocab_ids = vocab_ids
        self.confidence = confidence  # also output top_probability (drafts)
        self.capturable = capturable  # lengths as an input, not from the mask (module docstring)
        self.tree = tree  # position_ids and attention_bias inputs (module docstring)
        self.max_seq_len = max_seq_len
        self.weights = weights
        self.layout = architecture.kv_layout(model.config)
        self.nodes: list[onnx.NodeProto] = []
        self.used: set[str] = set()  # weights this graph reads (stored externally)
        self.constants: dict[str, np.ndarray] = {}  # small shape/index constants (stored inline)
        # Names of [1] int64 tensors set by build(): S, max(S, min_attention_rows), the mask's length
        # and that plus the padding row.
        self.sequence = self.attention_rows = self.mask_total = self.padded_total = ""
        self.padding_indices: dict[tuple[str, str], str] = {}  # pad_attention_rows' Gather indices
        self.tree_inputs: list[str] = []  # set by build() for a tree graph: [position_ids, bias], padded
        self.cached_layers: list[int] = []  # set by build(): the layers whose attention runs

    # -- helpers -----------------------------------------------------------------------------
    def op(
        self,
        op_type: str,
        inputs: list[str],
        name: str,
        outputs: int | list[str] = 1,
        domain: str = "",
        **attrs: object,
    ) -> list[str]:
        outs = outputs if isinstance(outputs, list) else [f"{name}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def weight(self, name: str, tensor: torch.Tensor | np.ndarray, keep_dtype: bool = False) -> str:
        self.used.add(name)
        if name in self.weights:  # an earlier graph of the artifact converted it already
            return name
        array = self.read(tensor) if isinstance(tensor, torch.Tensor) else tensor
        if not keep_dtype:
            array = array.astype(self.np_dtype)
        return self.weights.add(name, array)

    def const(self, name: str, values: Sequence[int] | int) -> str:
        self.constants[name] = np.asarray(values, dtype=np.int64)
        return name

    def linear(
        self,
        x: str,
        weight: torch.Tensor | np.ndarray,
        bias: torch.Tensor | np.ndarray | None,
        name: str,
        wname: str,
    ) -> str:
        weight = self.read(weight) if isinstance(weight, torch.Tensor) else weight
        if self.bits:
            y = self.matmul_nbits(x, weight, name, wname + ".weight")
        else:
            # HF stores [out, in]; MatMul wants [in, out]: transposed once here, at build time.
            y = self.op("MatMul", [x, self.weight(wname + ".weight", weight.T)], f"{name}/MatMul")[0]
        if bias is not None:
            y = self.op("Add", [y, self.weight(wname + ".bias", bias)], f"{name}/Add")[0]
        return y

    def matmul_nbits(self, x: str, weight: torch.Tensor | np.ndarray, name: str, wname: str) -> str:
        """x @ weight.T with ``weight`` [N, K] read as a ``self.bits``-bit block-quantized copy."""
        bits = self.bits
        assert bits is not None
        names = [f"{wname}.int{bits}", f"{wname}.int{bits}.scales", f"{wname}.int{bits}.zero_points"]
        n, k = weight.shape
        if names[0] not in self.weights:  # quantized once, shared by every graph that reads it
            array = self.read(weight) if isinstance(weight, torch.Tensor) else weight
            packed, scales, zero_points = quantize(np.asarray(array, np.float32), bits)
            tensors = (packed, scales.astype(self.np_dtype), zero_points)
            for tensor_name, values in zip(names, tensors, strict=True):
                self.weights.add(tensor_name, values)
        self.used.update(names)
        return self.op(
            "MatMulNBits",
            [x, *names],
            f"{name}/MatMulNBits",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=BLOCK_SIZE,
            accuracy_level=ACCURACY_LEVEL,
        )[0]

    def norm_weight(self, name: str, module: torch.nn.Module) -> str:
        return self.weight(name, self.read(module.weight) + self.arch.norm_offset)

    def rms_norm(self, x: str, module: torch.nn.Module, name: str, wname: str) -> str:
        eps = _epsilon(module)
        return self.op(
            "SimplifiedLayerNormalization",
            [x, self.norm_weight(wname, module)],
            name,
            axis=-1,
            epsilon=eps,
            stash_type=1,
        )[0]

    def skip_norm(
        self, x: str, residual: str, module: torch.nn.Module, name: str, wname: str
    ) -> tuple[str, str]:
        """(x + residual, rms_norm(x + residual)) in one fused op. Its optional mean and inverse
        standard deviation outputs stay unnamed: ONNX Runtime then neither allocates nor writes
        them (2-3 us a call here, 60 calls a SmolLM2 step)."""
        eps = _epsilon(module)
        normed, total = f"{name}/output_0", f"{name}/output_3"
        self.op(
            "SkipSimplifiedLayerNormalization",
            [x, residual, self.norm_weight(wname, module)],
            name,
            outputs=[normed, "", "", total],
            domain="com.microsoft",
            epsilon=eps,
        )
        return total, normed

    # -- model pieces ------------------------------------------------------------------------
    def rope_tables(self, keep_layers: Sequence[int]) -> dict[str, tuple[str, str]]:
        """cos/sin caches [max_seq_len, rotary_dim / 2] per RoPE kind the kept layers use, computed
        by the model's own rotary module (so every scaling scheme it implements is honoured)."""
        rotary = self.model.model.rotary_emb
        positions = torch.arange(self.max_seq_len).unsqueeze(0)
        dummy = torch.zeros(1, dtype=torch.float32)
        kinds = (
            sorted({self.config.layer_types[i] for i in keep_layers})
            if self.arch.rope_per_layer_type
            else ["default"]
        )
        tables = {}
        for kind in kinds:
            with torch.no_grad():
                cos, sin = rotary(dummy, positions, kind) if kind != "default" else rotary(dummy, positions)
            half = cos.shape[-1] // 2  # HF tables repeat the frequencies twice
            tables[kind] = (
                self.weight(f"rope.{kind}.cos", cos[0, :, :half]),
                self.weight(f"rope.{kind}.sin", sin[0, :, :half]),
            )
        return tables

    def attention(self, i: int, x: str, seqlens_k: str, total: str, rope: tuple[str, str]) -> str:
        attn = self.arch.blocks(self.arch.decoder_layers(self.model)[i])[0]
        name, wname = f"/model/layers.{i}/attn", f"model.layers.{i}.attn"
        heads, kv_heads, head_dim = (
            self.config.num_attention_heads,
            self.layout.num_kv_heads,
            self.layout.head_dim,
        )
        fused = [getattr(attn, self.arch.fused_qkv)] if self.arch.fused_qkv else None
        projs = fused or [attn.q_proj, attn.k_proj, attn.v_proj]
        weight = np.concatenate([self.read(p.weight) for p in projs])
        bias = np.concatenate([self.read(p.bias) for p in projs]) if projs[0].bias is not None else None
        qkv = self.linear(x, weight, bias, f"{name}/qkv", f"{wname}.qkv")
        if self.arch.qk_norm:
            sizes = self.const(
                f"{wname}.qkv_split", [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
            )
            q, k, v = self.op("Split", [qkv, sizes], f"{name}/qkv/Split", outputs=3, axis=-1)
            q = self._head_norm(q, attn.q_norm, f"{name}/q_norm", f"{wname}.q_norm.weight", head_dim)
            k = self._head_norm(k, attn.k_norm, f"{name}/k_norm", f"{wname}.k_norm.weight", head_dim)
            qkv_inputs = [q, k, v]
        else:
            qkv_inputs = [qkv, "", ""]  # packed QKV: GroupQueryAttention splits it itself
        if self.min_attention_rows > 1:
            qkv_inputs = [
                self.pad_attention_rows(t, f"{name}/pad{k}") if t else t for k, t in enumerate(qkv_inputs)
            ]
        window = self.layout.sliding_windows[i]
        cache = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        out = self.op(
            "GroupQueryAttention",
            [*qkv_inputs, *cache, seqlens_k, total, *rope, *self.tree_inputs],
            f"{name}/GroupQueryAttention",
            domain="com.microsoft",
            outputs=[f"{name}/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
            num_heads=heads,
            kv_num_heads=kv_heads,
            scale=float(attn.scaling),
            do_rotary=1,
            rotary_interleaved=0,
            # Same meaning as transformers' sliding_window (checked by the gemma3 parity test).
            local_window_size=-1 if window is None else window,
        )
        rows = out[0]
        if self.min_attention_rows > 1:
            unpad = [rows, self.const("zero", [0]), self.sequence, self.const("axes.1", [1])]
            rows = self.op("Slice", unpad, f"{name}/Unpad")[0]
        return self.linear(rows, attn.o_proj.weight, attn.o_proj.bias, f"{name}/o_proj", f"{wname}.o_proj")

    def pad_attention_rows(self, x: str, name: str, axis: int = 1, length: str = "", rows: str = "") -> str:
        """[B, S, D] -> [B, max(S, 2), D]: a one-token pass repeats its row. ONNX Runtime's CPU
        GroupQueryAttention multiplies probabilities by V through MLAS' M == 1 kernel when S == 1,
        whose sums differ in the last bits from any S >= 2 pass; every other float op here computes
        a row alike whatever S is (DESIGN.md, row invariance). The repeated row's K/V land one
        position past the valid length, where the next pass overwrites them. One Gather per padded
        tensor (its index is built once per graph): each node costs every pass a few microseconds,
        and the Concat + Slice this replaced cost 2% of an int4 SmolLM2 step (measured).
        (``axis``/``length``/``rows``: the same for another axis, its length and padded length,
        e.g. a tree graph's attention bias.)"""
        index = self.padding_index(length or self.sequence, rows or self.attention_rows)
        return self.op("Gather", [x, index], f"{name}/Gather", axis=axis)[0]

    def padding_index(self, length: str, rows: str) -> str:
        """min(arange(rows), length - 1) for two [1] int64 tensors: 0..length-1 when rows == length,
        0, 0 for a one-token pass. Built once per (length, rows) pair."""
        key = (length, rows)
        if key not in self.padding_indices:
            name = f"/model/padding_index.{len(self.padding_indices)}"
            axis0 = self.const("axes.0", [0])
            last = self.op("Sub", [length, self.const("one", [1])], f"{name}/Last")[0]
            count = self.op("Squeeze", [rows, axis0], f"{name}/Rows")[0]
            zero, one = self.const("scalar.0", 0), self.const("scalar.1", 1)
            positions = self.op("Range", [zero, count, one], f"{name}/Range")[0]
            self.padding_indices[key] = self.op("Min", [positions, last], f"{name}/Min")[0]
        return self.padding_indices[key]

    def pad_tree_inputs(self) -> list[str]:
        """A tree graph's position_ids [B, S] and attention_bias [B, 1, S, T], padded as the
        attention's rows are (a one-token pass: a second row, and a column for it; a capturable
        graph's bias already has max_seq_len columns). The padding row's position and bias are
        copies: its output is dropped and its K/V overwritten later."""
        position_ids, attention_bias = TREE_INPUTS
        if self.min_attention_rows == 1:
            return [position_ids, attention_bias]
        positions = self.pad_attention_rows(position_ids, "/model/tree/position_ids")
        bias = self.pad_attention_rows(attention_bias, "/model/tree/bias_rows", axis=2)
        if not self.capturable:
            bias = self.pad_attention_rows(
                bias, "/model/tree/bias_columns", axis=3, length=self.mask_total, rows=self.padded_total
            )
        return [positions, bias]

    def _head_norm(self, x: str, module: torch.nn.Module, name: str, wname: str, head_dim: int) -> str:
        shaped = self.op("Reshape", [x, self.const("shape.heads", [0, 0, -1, head_dim])], f"{name}/Reshape")[
            0
        ]
        normed = self.rms_norm(shaped, module, f"{name}/Norm", wname)
        return self.op("Reshape", [normed, self.const("shape.flat", [0, 0, -1])], f"{name}/Flatten")[0]

    def mlp(self, i: int, x: str) -> str:
        mlp = self.arch.blocks(self.arch.decoder_layers(self.model)[i])[1]
        name, wname = f"/model/layers.{i}/mlp", f"model.layers.{i}.mlp"
        if self.arch.fused_gate_up:
            gate_w, up_w = np.split(self.read(getattr(mlp, self.arch.fused_gate_up).weight), 2)
        else:
            gate_w, up_w = mlp.gate_proj.weight, mlp.up_proj.weight
        gate = self.linear(x, gate_w, None, f"{name}/gate_proj", f"{wname}.gate_proj")
        up = self.linear(x, up_w, None, f"{name}/up_proj", f"{wname}.up_proj")
        act = getattr(self.config, "hidden_activation", None) or self.config.hidden_act
        if act == "silu":
            sig = self.op("Sigmoid", [gate], f"{name}/act/Sigmoid")[0]
            gate = self.op("Mul", [gate, sig], f"{name}/act/Mul")[0]
        elif act in ("gelu_pytorch_tanh", "gelu_new"):
            gate = self.op("Gelu", [gate], f"{name}/act/Gelu", approximate="tanh")[0]
        else:
            raise NotImplementedError(f"activation {act!r} is not supported by the graph builder")
        hidden = self.op("Mul", [gate, up], f"{name}/Mul")[0]
        return self.linear(hidden, mlp.down_proj.weight, None, f"{name}/down_proj", f"{wname}.down_proj")

    def _block_norms(self, block: str) -> tuple[tuple[str, str], tuple[str, str] | None]:
        """((norm attribute of the layer, node name) before the block, the same after it or None)."""
        sandwich = self.arch.sandwich_norms
        if block == "attention":
            return ("input_layernorm", "input_norm"), (
                ("post_attention_layernorm", "post_attn_norm") if sandwich else None
            )
        pre = "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"
        return (pre, "pre_mlp_norm"), (("post_feedforward_layernorm", "post_mlp_norm") if sandwich else None)

    def build(
        self, keep_layers: Sequence[int], graph_name: str, skipped_blocks: dict[str, Collection[int]]
    ) -> onnx.ModelProto:
        layers = self.arch.decoder_layers(self.model)
        inner = self.model.model
        self.sequence = self.op("Shape", ["input_ids"], "/model/rows/Shape", start=1, end=2)[0]  # [1]: S
        least = self.const("min_rows", [self.min_attention_rows])
        self.attention_rows = self.op("Max", [self.sequence, least], "/model/rows/Max")[0]
        seqlens_k, total = self.lengths() if not self.capturable else self.lengths_given()
        if self.tree:
            self.tree_inputs = self.pad_tree_inputs()
        self.cached_layers = [i for i in keep_layers if i not in skipped_blocks["attention"]]
        rope = self.rope_tables(self.cached_layers)

        embed = self.weight("model.embed_tokens.weight", inner.embed_tokens.weight)
        residual = self.op("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather")[0]
        scale = getattr(inner.embed_tokens, "scalar_embed_scale", None)
        if scale is not None:  # gemma multiplies embeddings by sqrt(hidden) in the weights' dtype
            factor = self.weight("model.embed_scale", np.asarray(scale, dtype=np.float32))
            residual = self.op("Mul", [residual, factor], "/model/embed_tokens/Scale")[0]

        pending: str | None = None  # the last block output, not yet added to the residual
        for i in keep_layers:
            for block in ("attention", "mlp"):
                if i in skipped_blocks[block]:  # its output is zero: the residual passes through
                    continue
                (pre, pre_node), post = self._block_norms(block)
                prefix, wname = f"/model/layers.{i}/{pre_node}", f"model.layers.{i}.{pre}.weight"
                module = getattr(layers[i], pre)
                if pending is None:
                    x = self.rms_norm(residual, module, prefix, wname)
                else:
                    residual, x = self.skip_norm(pending, residual, module, prefix, wname)
                if block == "attention":
                    kind = self.config.layer_types[i] if self.arch.rope_per_layer_type else "default"
                    pending = self.attention(i, x, seqlens_k, total, rope[kind])
                else:
                    pending = self.mlp(i, x)
                if post is not None:  # sandwich norms: the block's output is normalised too
                    name, node = post
                    module, wname = getattr(layers[i], name), f"model.layers.{i}.{name}.weight"
                    pending = self.rms_norm(pending, module, f"/model/layers.{i}/{node}", wname)
        _, x = self.skip_norm(pending, residual, inner.norm, "/model/norm", "model.norm.weight")

        logits = self.head(x, embed)
        if self.onnx_dtype != TensorProto.FLOAT:
            logits = self.op("Cast", [logits], "/lm_head/Cast", to=TensorProto.FLOAT)[0]
        logits = self.name_output(logits, "logits")
        self.token_choice(logits)
        return self._model(graph_name)

    def lengths(self) -> tuple[str, str]:
        """(seqlens_k, total_sequence_length) for GroupQueryAttention from the attention mask, as
        onnxruntime-genai derives them: seqlens_k = cached + S - 1 and total = cached + S, each plus
        the attention padding row of a one-token pass (see pad_attention_rows)."""
        padding = self.op("Sub", [self.attention_rows, self.sequence], "/model/rows/Padding")[0]
        mask_sum = self.op(
            "ReduceSum", ["attention_mask", self.const("axes.1", [1])], "/model/mask/ReduceSum", keepdims=0
        )[0]
        last = self.op("Sub", [padding, self.const("one", [1])], "/model/mask/Last")[0]  # padding - 1
        seqlens = self.op("Add", [mask_sum, last], "/model/mask/Add")[0]
        seqlens_k = self.op("Cast", [seqlens], "/model/mask/seqlens_k", to=TensorProto.INT32)[0]
        shape = self.mask_total = self.op("Shape", ["attention_mask"], "/model/mask/Shape", start=1, end=2)[0]
        padded = self.padded_total = self.op("Add", [shape, padding], "/model/mask/Padded")[0]
        total64 = self.op("Squeeze", [padded, self.const("axes.0", [0])], "/model/mask/Squeeze")[0]
        return seqlens_k, self.op("Cast", [total64], "/model/mask/total", to=TensorProto.INT32)[0]

    def lengths_given(self) -> tuple[str, str]:
        """A capturable graph's lengths: seqlens_k is an input (device memory, updated in place
        between replays) and the total a constant max_seq_len. GroupQueryAttention reads the total
        on the host, so a captured replay must not see it change; its kernels bound each row's
        keys by seqlens_k, the positions past it are never read."""
        total = "total_sequence_length"
        self.constants[total] = np.asarray(self.max_seq_len, dtype=np.int32)
        return "seqlens_k", total

    def token_choice(self, logits: str) -> None:
        """next_token_ids (and, with ``confidence``, top_probability) from the float32 logits. ArgMax
        keeps the first of equal maxima, as numpy's argmax does, so both paths choose alike."""
        best = self.op("ArgMax", [logits], "/choice/ArgMax", axis=-1, keepdims=0)[0]
        if self.vocab_ids is not None:  # a pruned draft: column j scores token vocab_ids[j]
            table = self.weight(draft_vocab_name(len(self.vocab_ids)), self.vocab_ids, keep_dtype=True)
            best = self.op("Gather", [table, best], "/choice/TokenIds")[0]
        self.name_output(best, "next_token_ids")
        if not self.confidence:
            return
        # 1 / sum(exp(logits - max)): the softmax probability of the argmax
        axes = self.const("axes.-1", [-1])
        top = self.op("ReduceMax", [logits, axes], "/choice/ReduceMax", keepdims=1)[0]
        shifted = self.op("Exp", [self.op("Sub", [logits, top], "/choice/Sub")[0]], "/choice/Exp")[0]
        total = self.op("ReduceSum", [shifted, axes], "/choice/ReduceSum", keepdims=0)[0]
        self.op("Reciprocal", [total], "/choice/Probability", outputs=["top_probability"])

    @property
    def vocab_width(self) -> int:
        return self.config.vocab_size if self.vocab_ids is None else len(self.vocab_ids)

    def head(self, x: str, embed: str) -> str:
        """Logits [batch, rows, vocab_width] of the final hidden states [batch, rows, hidden]."""
        head = self.model.lm_head.weight
        table = self.model.model.embed_tokens.weight
        # Tied, or untied with equal values (GGUF files often carry the output head as a copy of
        # the embeddings): either way the head reads the embedding table, stored once.
        rows = self.read(head)
        tied = head is table or (head.shape == table.shape and np.array_equal(rows, self.read(table)))
        name = embed if tied else "lm_head.weight"
        if self.vocab_ids is not None:  # a pruned head: its own contiguous copy of the kept rows
            name = f"{name}.vocab{len(self.vocab_ids)}"
            rows = rows[self.vocab_ids]
        if self.bits:  # MatMulNBits reads [batch, rows, hidden] as it is
            return self.matmul_nbits(x, rows, "/lm_head", name)
        # Gemm(transB=1) reads the [vocab, hidden] table as stored (MatMul would need a transposed
        # copy), on [batch * rows, hidden].
        weight = embed if tied and self.vocab_ids is None else self.weight(name, rows)
        flat = self.op(
            "Reshape", [x, self.const("shape.rows", [-1, self.config.hidden_size])], "/lm_head/Rows"
        )[0]
        logits = self.op("Gemm", [flat, weight], "/lm_head/Gemm", transB=1)[0]
        out_shape = self.op(
            "Concat",
            [
                self.op("Shape", ["input_ids"], "/lm_head/Shape")[0],
                self.const("vocab", [self.vocab_width]),
            ],
            "/lm_head/OutShape",
            axis=0,
        )[0]
        return self.op("Reshape", [logits, out_shape], "/lm_head/Reshape")[0]

    def name_output(self, value: str, output: str) -> str:
        """Let the node that computes ``value`` (the last one built) write the graph output
        ``output`` itself: a bound output buffer is then written by that kernel, not copied into
        by an Identity after it (a logits copy: ~30 us a SmolLM2 step)."""
        node = self.nodes[-1]
        node.output[list(node.output).index(value)] = output
        return output

    def _model(self, graph_name: str) -> onnx.ModelProto:
        kv_shape = ["batch", self.layout.num_kv_heads, self.max_seq_len, self.layout.head_dim]
        lengths = (
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"])
            if self.capturable
            else helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])
        )
        ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
        inputs = [ids, lengths]
        if self.tree:
            position_ids, attention_bias = TREE_INPUTS
            inputs += [
                helper.make_tensor_value_info(position_ids, TensorProto.INT64, ["batch", "sequence"]),
                helper.make_tensor_value_info(
                    attention_bias, self.onnx_dtype, ["batch", 1, "sequence", "total"]
                ),
            ]
        choice = [("next_token_ids", TensorProto.INT64)]
        if self.confidence:
            choice.append(("top_probability", TensorProto.FLOAT))
        outputs = [
            *(helper.make_tensor_value_info(name, kind, ["batch", "sequence"]) for name, kind in choice),
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch", "sequence", self.vocab_width]
            ),
        ]
        for i in self.cached_layers:  # layers whose attention runs
            for kind in ("key", "value"):
                inputs.append(
                    helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", self.onnx_dtype, kv_shape)
                )
                outputs.append(
                    helper.make_tensor_value_info(f"present.{i}.{kind}", self.onnx_dtype, kv_shape)
                )
        # Weights are attached later as external data (see weights.py); constants live inline.
        constants = [numpy_helper.from_array(v, name) for name, v in self.constants.items()]
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, initializer=constants)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
            producer_name="conflayers-export",
        )
        model.ir_version = 10
        return model


def draft_vocab_name(size: int) -> str:
    """The weights-file tensor of a pruned draft's token ids (its logits column -> token id)."""
    return f"draft_vocab.{size}.token_ids"


def _epsilon(norm: torch.nn.Module) -> float:
    """RMSNorm epsilon: Llama-style modules call it variance_epsilon, Gemma-style ones eps."""
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def build_graph(
    model: torch.nn.Module,
    architecture: Architecture,
    keep_layers: Sequence[int],
    dtype: str,
    max_seq_len: int,
    weights: WeightStore,
    graph_name: str,
    bits: int | None = None,
    vocab_ids: np.ndarray | None = None,
    confidence: bool = False,
    capturable: bool = False,
    read: Callable[[torch.Tensor], np.ndarray] = host_array,
    skip_attention: Collection[int] = (),
    skip_mlp: Collection[int] = (),
    tree: bool = False,
) -> tuple[onnx.ModelProto, set[str]]:
    """Build one graph that runs ``keep_layers`` (with ``bits``-bit linears and a head over
    ``vocab_ids`` when given; ``confidence``: a draft's top_probability output; ``capturable``:
    lengths as an input, see the module docstring; ``read``: a parameter's values, for a model
    whose weights are not in memory; ``skip_attention`` / ``skip_mlp``: kept layers whose
    attention or MLP block the graph leaves out; ``tree``: position_ids and attention_bias inputs, see
    the module docstring); returns it and the names of the weights it reads."""
    builder = _GraphBuilder(
        model, architecture, dtype, max_seq_len, weights, bits, vocab_ids, confidence, capturable, read, tree
    )
    graph = builder.build(list(keep_layers), graph_name, {"attention": skip_attention, "mlp": skip_mlp})
    return graph, builder.used
