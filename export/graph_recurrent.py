"""Build the ONNX decoder of a recurrent model (craft/recurrent.py): fixed-size state I/O.

Same skeleton and schemes as graph.py (embedding, RMSNorm, SwiGLU, head are written the same
way); each block's attention is replaced by the gated recurrence

    a = sigmoid(x W_a + decay) (1 at pads);  h_t = a_t * h_{t-1} + (1 - a_t) * x_t W_v

whose projections run over the whole sequence at once, and whose recurrence runs in an ONNX
Scan over the time axis: one multiply-add on (B, dim) per token. Why Scan and not the doubling
scan that training uses (craft.recurrent.linear_scan): a decode step is T = 1, one iteration of
two elementwise ops, and the doubling scan's step count log2(T) would need a Loop with dynamic
slicing for the same result. The state goes in as
past_state.{i} (B, dim) and comes out as present_state.{i}: the same size at any context.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from craft.export.graph import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, GraphBuilder, contract_io, logits_positions
from craft.runtime import artifact as A
from craft.runtime import weights as W
from craft.runtime.artifact import ModelSpec


def scan_body() -> onnx.GraphProto:
    """One time step: (h (B, D), a_t (B, D), u_t (B, D)) -> (h' = a_t * h + u_t, h' again as the scan output)."""

    def value(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)

    nodes = [
        helper.make_node("Mul", ["h", "a_t"], ["h_kept"]),
        helper.make_node("Add", ["h_kept", "u_t"], ["h_next"]),
        helper.make_node("Identity", ["h_next"], ["h_t"]),
    ]
    return helper.make_graph(
        nodes, "recurrence_step", [value("h"), value("a_t"), value("u_t")], [value("h_next"), value("h_t")]
    )


def build_recurrent_decoder(
    spec: ModelSpec, weights: dict[str, np.ndarray], scheme, opset: int = DEFAULT_OPSET
) -> onnx.ModelProto:
    """The recurrent decoder with state I/O of the artifact contract (craft.runtime.artifact).

    `weights` are float32 arrays named and laid out as craft.runtime.weights describes for a
    recurrent model; `scheme` (quantize.OPS) writes the linear layers, the embedding and the head.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET}, got {opset}")
    g = GraphBuilder(opset)
    D, L = spec.dim, spec.n_layer

    # the gate of this call's tokens: the last T columns of attention_mask, (B, T, 1) float ------
    T = g.op("Slice", g.op("Shape", A.INPUT_IDS), g.const([1]), g.const([2]))  # (1,)
    step_mask = g.op(
        "Slice", A.ATTENTION_MASK, g.op("Neg", T), g.const([np.iinfo(np.int64).max]), g.const([1]), g.const([1])
    )  # (B, T)
    mask = g.op("Unsqueeze", g.op("Cast", step_mask, to=TensorProto.FLOAT), g.const([-1]))  # (B, T, 1)
    pad = g.op("Sub", g.const(1.0, np.float32), mask)  # (B, T, 1): 1 at pads
    body = scan_body()

    x = scheme.embedding(g, weights, A.INPUT_IDS)  # (B, T, dim)
    for i in range(L):
        n = W.recurrent_layer(i)
        h = g.rms_norm(x, g.weight(n.recurrence_norm, weights[n.recurrence_norm]), spec.norm_eps)
        a_in, v, gate = g.split(scheme.linear(g, h, n.win, weights[n.win]), [D, D, D], axis=-1)  # (B, T, dim) each
        a = g.op("Sigmoid", g.op("Add", a_in, g.weight(n.decay, weights[n.decay])))
        a = g.op("Add", g.op("Mul", a, mask), pad)  # pads: a = 1
        u = g.op("Mul", g.op("Sub", g.const(1.0, np.float32), a), v)  # (1 - a) * v; pads: 0
        _, states = g.op(
            "Scan",
            A.past_state_name(i),
            a,
            u,
            outputs=[A.present_state_name(i), f"layers.{i}.states"],
            body=body,
            num_scan_inputs=2,
            scan_input_axes=[1, 1],
            scan_output_axes=[1],
        )  # (B, T, dim)
        y = g.op("Mul", states, g.op("Mul", gate, g.op("Sigmoid", gate)))  # h * silu(g)
        x = g.op("Add", x, scheme.linear(g, y, n.wo, weights[n.wo]))

        h = g.rms_norm(x, g.weight(n.ffn_norm, weights[n.ffn_norm]), spec.norm_eps)
        up_gate, up = g.split(scheme.linear(g, h, n.w13, weights[n.w13]), [spec.hidden_dim, spec.hidden_dim], axis=-1)
        act = g.op("Mul", g.op("Mul", up_gate, g.op("Sigmoid", up_gate)), up)  # silu(gate) * up
        x = g.op("Add", x, scheme.linear(g, act, n.w2, weights[n.w2]))

    x = g.rms_norm(x, g.weight(W.NORM, weights[W.NORM]), spec.norm_eps)
    scheme.head(g, weights, logits_positions(g, x), A.LOGITS, spec)  # (B, K, vocab)

    def tensor(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    inputs, outputs = contract_io(spec)  # position_ids unused here: one loop drives both kinds
    inputs += [tensor(A.past_state_name(i), TensorProto.FLOAT, ["batch", D]) for i in range(L)]
    outputs += [tensor(A.present_state_name(i), TensorProto.FLOAT, ["batch", D]) for i in range(L)]

    return g.model("craft_recurrent_decoder", inputs, outputs)
