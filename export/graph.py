"""Build the portable ONNX decoder graph, node by node, from weights in the artifact layout.

One graph serves prefill (past length 0) and decode (one new token) for any batch: every
sequence axis is dynamic. Standard ONNX ops (opset 14..21), except a quantized scheme's
com.microsoft MatMulNBits (quantize.py), which the model then imports. ONNX Runtime fuses the
patterns written here (RMSNorm -> SimplifiedLayerNormalization, Transpose + MatMul ->
FusedMatMul) at load time on whatever CPU it runs on, so the file itself carries no
machine-specific ops.

How linear layers, the embedding and the LM head are written (float, int8, int4) is the
quantization scheme's business (quantize.py, with craft.runtime.weights); this file is the
network's structure, the same function as craft.model.Transformer.forward with a KV-cache.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from craft.runtime import artifact as A
from craft.runtime import weights as W
from craft.runtime.artifact import ModelSpec

MASKED = float(np.finfo(np.float32).min)  # additive bias for masked keys, as in craft.model
DEFAULT_OPSET = 17  # ONNX Runtime >= 1.13 and most other runtimes; see README "Artifact"
MIN_OPSET, MAX_OPSET = 14, 21


class GraphBuilder:
    """Collects nodes and initializers; op() returns output names, fresh unless given."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.uses_ms_domain = False
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small constant initializer, shared between identical uses."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"const_{len(self._consts)}", array)
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "", name: str = "", **attrs):
        self._count += 1
        base = name or f"{op_type}_{self._count}"
        outs = (
            outputs
            if isinstance(outputs, list)
            else [f"{base}_out{i}" if outputs > 1 else f"{base}_out" for i in range(outputs)]
        )
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain or None, **attrs))
        if domain == "com.microsoft":
            self.uses_ms_domain = True
        return outs[0] if len(outs) == 1 else outs

    def model(self, name: str, inputs: list, outputs: list) -> onnx.ModelProto:
        """The Craft ModelProto of the nodes and initializers so far: this opset (and com.microsoft
        when a node uses it), the IR version that opset allows."""
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        if self.uses_ms_domain:
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="craft", domain=A.DOMAIN)
        model.ir_version = min(model.ir_version, ir_version_for(self.opset))
        return model

    # small composites ------------------------------------------------------------------------
    def reduce_mean_last(self, x: str) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.const([-1]), keepdims=1)
        return self.op("ReduceMean", x, axes=[-1], keepdims=1)

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        return self.op("Split", x, self.const(sizes), axis=axis, outputs=len(sizes))

    def rms_norm(self, x: str, weight: str, eps: float) -> str:
        """x / sqrt(mean(x^2) + eps) * weight, in the pattern ONNX Runtime fuses."""
        mean_sq = self.reduce_mean_last(self.op("Pow", x, self.const(2.0, np.float32)))
        rms = self.op("Sqrt", self.op("Add", mean_sq, self.const(eps, np.float32)))
        return self.op("Mul", self.op("Div", x, rms), weight)


def build_decoder(
    spec: ModelSpec, weights: dict[str, np.ndarray], scheme, opset: int = DEFAULT_OPSET, attention: str = "standard"
) -> onnx.ModelProto:
    """The decoder with KV-cache I/O of the artifact contract.

    `weights` are float32 arrays named and laid out as craft.runtime.weights describes;
    `scheme` (quantize.OPS) writes the linear layers, the embedding and the LM head.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET}, got {opset}")
    if attention not in A.ATTENTIONS:
        raise ValueError(f"--attention must be one of {', '.join(A.ATTENTIONS)}, got '{attention}'")
    g = GraphBuilder(opset)
    KV, hd, L = spec.n_kv_head, spec.head_dim, spec.n_layer

    # Rotary tables stay in every file under their contract names (the numpy backend reads them).
    rope_cos, rope_sin = g.weight(W.ROPE_COS, weights[W.ROPE_COS]), g.weight(W.ROPE_SIN, weights[W.ROPE_SIN])
    S = g.op("Gather", g.op("Shape", A.ATTENTION_MASK), g.const(1), axis=0)  # scalar: past + T
    attend = (inplace_attention if attention == A.ATTENTION_INPLACE else standard_attention)(
        g, spec, S, rope_cos, rope_sin
    )

    fuse_norms = (
        attention == A.ATTENTION_INPLACE
    )  # com.microsoft is required anyway: one node per residual Add + RMSNorm

    def add_and_norm(x: str, delta: str, norm: str) -> tuple[str, str]:
        """(rms_norm(x + delta), x + delta): the residual stream and the next block's input."""
        weight = g.weight(norm, weights[norm])
        if not fuse_norms:
            x = g.op("Add", x, delta)
            return g.rms_norm(x, weight, spec.norm_eps), x
        h, _, _, x = g.op(
            "SkipSimplifiedLayerNormalization",
            delta,
            x,
            weight,
            domain="com.microsoft",
            epsilon=spec.norm_eps,
            outputs=[f"{norm}.out", "", "", f"{norm}.residual"],
        )
        return h, x

    x = scheme.embedding(g, weights, A.INPUT_IDS)  # (B, T, dim)
    first = W.layer(0).attention_norm
    h = g.rms_norm(x, g.weight(first, weights[first]), spec.norm_eps)
    ffn_rotation = g.weight(W.FFN_ROTATION, weights[W.FFN_ROTATION]) if spec.ffn_rotation else None  # every layer's
    for i in range(L):
        n = W.layer(i)
        qkv = scheme.linear(g, h, n.wqkv, weights[n.wqkv])  # (B, T, (H + 2KV) * hd)
        if spec.qkv_bias:  # float32 in every scheme; added before rotary (inside the attention)
            qkv = g.op("Add", qkv, g.weight(n.wqkv_bias, weights[n.wqkv_bias]))
        h, x = add_and_norm(x, scheme.linear(g, attend(i, qkv), n.wo, weights[n.wo]), n.ffn_norm)
        gate, up = g.split(scheme.linear(g, h, n.w13, weights[n.w13]), [spec.hidden_dim, spec.hidden_dim], axis=-1)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)  # silu(gate) * up
        if spec.ffn_rotation:  # w2's input turned per block (rotation.py), as weights.rotate_blocks does
            b = W.FFN_ROTATION_BLOCK
            blocks = g.op("Reshape", act, g.const([0, 0, spec.hidden_dim // b, b]))  # (B, T, hidden / b, b)
            turned = g.op("MatMul", blocks, ffn_rotation)
            act = g.op("Reshape", turned, g.const([0, 0, spec.hidden_dim]))  # (B, T, hidden)
        h, x = add_and_norm(
            x, scheme.linear(g, act, n.w2, weights[n.w2]), W.layer(i + 1).attention_norm if i + 1 < L else W.NORM
        )

    h = logits_positions(g, h)  # (B, K, dim)
    if spec.head_rotation:  # a rotated residual stream (rotation.py): back to the tied table's basis
        h = g.op("MatMul", h, g.weight(W.HEAD_ROTATION, weights[W.HEAD_ROTATION]))
    scheme.head(g, weights, h, A.LOGITS, spec)

    inputs, outputs = contract_io(spec)
    past_axis, present_axis = (
        ("cache_seq", "cache_seq") if attention == A.ATTENTION_INPLACE else ("past_seq", "total_seq")
    )
    for i in range(L):
        for name in A.past_names(i):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", KV, past_axis, hd]))
        for name in A.present_names(i):
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", KV, present_axis, hd]))

    return g.model("craft_decoder", inputs, outputs)


def contract_io(spec: ModelSpec) -> tuple[list, list]:
    """The graph inputs and outputs every Craft decoder shares (artifact.py's names): input_ids,
    attention_mask, position_ids, logits_to_keep -> logits. Each architecture appends its cache
    or state."""
    inputs = [
        helper.make_tensor_value_info(A.INPUT_IDS, TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info(A.ATTENTION_MASK, TensorProto.INT64, ["batch", "total_seq"]),
        helper.make_tensor_value_info(A.POSITION_IDS, TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info(A.LOGITS_TO_KEEP, TensorProto.INT64, [1]),
    ]
    outputs = [helper.make_tensor_value_info(A.LOGITS, TensorProto.FLOAT, ["batch", "kept_seq", spec.vocab_size])]
    return inputs, outputs


def logits_positions(g: GraphBuilder, h: str) -> str:
    """h (B, T, dim) -> its last K = logits_to_keep positions (all T for 0, the input's default),
    the only ones the head then runs on. A prefill needs its last position's logits alone, and
    at small sizes the head is most of a token's arithmetic (15M class, vocab 32000: 63%)."""
    g.weight(A.LOGITS_TO_KEEP, np.array([0], np.int64))  # the default of an input that is not fed
    start = g.op("Neg", A.LOGITS_TO_KEEP)  # (1,): -K; -0 = 0 keeps every position, as does K > T
    return g.op("Slice", h, start, g.const([np.iinfo(np.int64).max]), g.const([1]))  # (B, K, dim)


def standard_attention(g: GraphBuilder, spec: ModelSpec, S: str, rope_cos: str, rope_sin: str):
    """Standard ONNX ops: rotary from position_ids, a causal + padding bias, the cache grown by
    Concat (present = past + new). Returns attend(layer, qkv (B, T, (H + 2KV) * hd)) -> (B, T, H * hd)."""
    H, KV, hd = spec.n_head, spec.n_kv_head, spec.head_dim
    group = H // KV

    # attention bias (B, 1, T, S): 0 where a query may read a key, MASKED elsewhere --------------
    T = g.op("Gather", g.op("Shape", A.INPUT_IDS), g.const(1), axis=0)  # scalar
    P = g.op("Sub", S, T)
    key_pos = g.op("Range", g.const(0), S, g.const(1))  # (S,)
    query_pos = g.op("Range", P, S, g.const(1))  # (T,)
    causal = g.op(
        "LessOrEqual", g.op("Unsqueeze", key_pos, g.const([0])), g.op("Unsqueeze", query_pos, g.const([1]))
    )  # (T, S)
    not_pad = g.op("Unsqueeze", g.op("Cast", A.ATTENTION_MASK, to=TensorProto.BOOL), g.const([1, 2]))  # (B, 1, 1, S)
    bias = g.op(
        "Where", g.op("And", causal, not_pad), g.const(0.0, np.float32), g.const(MASKED, np.float32)
    )  # (B, 1, T, S)
    if group > 1:
        bias = g.op("Unsqueeze", bias, g.const([1]))  # (B, 1, 1, T, S) against (B, KV, G, T, S)

    # rotary tables for these positions, shaped for (B, T, heads, hd) --------------------------
    cos = g.op("Unsqueeze", g.op("Gather", rope_cos, A.POSITION_IDS, axis=0), g.const([2]))  # (B, T, 1, hd)
    sin = g.op("Unsqueeze", g.op("Gather", rope_sin, A.POSITION_IDS, axis=0), g.const([2]))
    half_sign = np.concatenate([-np.ones(hd // 2), np.ones(hd // 2)]).astype(np.float32)
    sin_signed = g.op("Mul", sin, g.const(half_sign, np.float32))  # rotate_half(x) * sin == swap_halves(x) * sin_signed

    def rope(x: str) -> str:
        lo, hi = g.split(x, [hd // 2, hd // 2], axis=-1)
        swapped = g.op("Concat", hi, lo, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", swapped, sin_signed))

    def attend(i: int, qkv: str) -> str:
        (past_k, past_v), (present_k, present_v) = A.past_names(i), A.present_names(i)
        qkv = g.op("Reshape", qkv, g.const([0, 0, H + 2 * KV, hd]))  # (B, T, H + 2KV, hd)
        qk, v = g.split(qkv, [H + KV, KV], axis=2)
        qk = g.op("Transpose", rope(qk), perm=[0, 2, 1, 3])  # (B, H + KV, T, hd)
        q, k = g.split(qk, [H, KV], axis=1)  # (B, H, T, hd), (B, KV, T, hd)
        v = g.op("Transpose", v, perm=[0, 2, 1, 3])  # (B, KV, T, hd)
        k = g.op("Concat", past_k, k, axis=2, outputs=[present_k])  # (B, KV, S, hd)
        v = g.op("Concat", past_v, v, axis=2, outputs=[present_v])
        if group > 1:  # query head h reads kv head h // group, without copying the cache
            q = g.op("Reshape", q, g.const([0, KV, group, -1, hd]))  # (B, KV, G, T, hd)
            k = g.op("Unsqueeze", k, g.const([2]))  # (B, KV, 1, S, hd)
            v = g.op("Unsqueeze", v, g.const([2]))
        perm = [0, 1, 2, 4, 3] if group > 1 else [0, 1, 3, 2]
        scores = g.op("MatMul", q, g.op("Transpose", k, perm=perm))  # (B, H, T, S); q is pre-scaled
        probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
        y = g.op("MatMul", probs, v)  # (B, H, T, hd) or (B, KV, G, T, hd)
        if group > 1:
            y = g.op("Reshape", y, g.const([0, H, -1, hd]))  # (B, H, T, hd)
        return g.op("Reshape", g.op("Transpose", y, perm=[0, 2, 1, 3]), g.const([0, 0, H * hd]))  # (B, T, H * hd)

    return attend


def inplace_attention(g: GraphBuilder, spec: ModelSpec, S: str, rope_cos: str, rope_sin: str):
    """ONNX Runtime's com.microsoft GroupQueryAttention: rotary, attention and the cache write in
    one node per layer. The cache is one (B, KV, context, hd) buffer per tensor that the runtime
    binds as both past and present (past_present_share_buffer): each step writes its new keys in
    place at each row's length, nothing is copied. Rows are counted from the mask (seqlens_k =
    valid tokens - 1, as GenAI feeds it); positions follow from them, so position_ids is unused:
    the runtime packs each row's tokens at the start of its buffer (runtime/ort_backend.py)."""
    H, KV, hd = spec.n_head, spec.n_kv_head, spec.head_dim
    seqlens_k = g.op(
        "Cast",
        g.op("Sub", g.op("ReduceSum", A.ATTENTION_MASK, g.const([1]), keepdims=0), g.const(1)),
        to=TensorProto.INT32,
    )  # (B,)
    total = g.op("Cast", S, to=TensorProto.INT32)  # scalar
    # (context, hd / 2): the distinct half of each "rotate half" table, sliced from the contract's
    # tables (no second copy in the file; ONNX Runtime folds the Slice at load)
    cos, sin = (g.op("Slice", table, g.const([0]), g.const([hd // 2]), g.const([1])) for table in (rope_cos, rope_sin))

    def attend(i: int, qkv: str) -> str:
        (past_k, past_v), (present_k, present_v) = A.past_names(i), A.present_names(i)
        y, _, _ = g.op(
            "GroupQueryAttention",
            qkv,
            "",
            "",
            past_k,
            past_v,
            seqlens_k,
            total,
            cos,
            sin,  # packed q, k, v
            outputs=[f"attention_{i}", present_k, present_v],
            domain="com.microsoft",
            num_heads=H,
            kv_num_heads=KV,
            scale=1.0,
            do_rotary=1,
            rotary_interleaved=0,
        )  # q is pre-scaled
        return y  # (B, T, H * hd)

    return attend


def ir_version_for(opset: int) -> int:
    """The IR version that goes with an opset (older runtimes refuse newer IR versions)."""
    return {14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}[opset]
