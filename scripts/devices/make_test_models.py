#!/usr/bin/env python3
"""Build tiny ONNX models + reference outputs for the emulated-ARM smoke test.

Runs on the HOST (needs `onnx`, `onnxruntime`, `numpy`, e.g. /work/venv).
Writes into OUT_DIR (default .cache/devices/models):

  core.onnx         opset 17: Gather, Concat, MatMul, Softmax,
                    DynamicQuantizeLinear + MatMulInteger (per-column zero point),
                    DequantizeLinear per-axis (int8 weight, axis=1)
  nbits8.onnx       com.microsoft MatMulNBits bits=8, block_size=32
  nbits4.onnx       com.microsoft MatMulNBits bits=4, block_size=32
  opset_NN.onnx     a single Add at default-domain opset NN (to probe max opset)
  <name>.npz        inputs ("in_<x>"), host-ORT outputs with default graph
                    optimizations ("out_<y>") and with none ("ref_<y>")

The guest side (check_ort.py) needs only numpy + onnxruntime.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET_RANGE = range(13, 31)
RNG = np.random.default_rng(1234)


def _ir_for(opset: int) -> int:
    try:
        return helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    except Exception:  # opset unknown to this onnx version
        return onnx.IR_VERSION


def core_model() -> tuple[onnx.ModelProto, dict]:
    V, D, H, T = 50, 16, 12, 5
    emb = RNG.standard_normal((V, D)).astype(np.float32)
    w = RNG.standard_normal((2 * D, H)).astype(np.float32) * 0.2
    # uint8 weight for MatMulInteger, per-column zero point
    wq_u8 = RNG.integers(0, 256, size=(2 * D, H), dtype=np.uint8)
    wzp_u8 = RNG.integers(100, 156, size=(H,), dtype=np.uint8)
    # int8 weight with per-axis (axis=1) scale for DequantizeLinear
    wq_i8 = RNG.integers(-127, 128, size=(2 * D, H), dtype=np.int8)
    wsc = (RNG.random(H).astype(np.float32) + 0.5) * 0.01
    wzp_i8 = np.zeros(H, dtype=np.int8)

    inits = [
        numpy_helper.from_array(emb, "emb"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(wq_u8, "wq_u8"),
        numpy_helper.from_array(wzp_u8, "wzp_u8"),
        numpy_helper.from_array(wq_i8, "wq_i8"),
        numpy_helper.from_array(wsc, "wsc"),
        numpy_helper.from_array(wzp_i8, "wzp_i8"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], axis=0),
        helper.make_node("Concat", ["e", "e2"], ["c"], axis=-1),
        helper.make_node("MatMul", ["c", "w"], ["y"]),
        helper.make_node("Softmax", ["y"], ["probs"], axis=-1),
        helper.make_node("DynamicQuantizeLinear", ["c"], ["cq", "cs", "cz"]),
        helper.make_node("MatMulInteger", ["cq", "wq_u8", "cz", "wzp_u8"], ["yi"]),
        helper.make_node("DequantizeLinear", ["wq_i8", "wsc", "wzp_i8"], ["wdq"], axis=1),
        helper.make_node("MatMul", ["c", "wdq"], ["ydq"]),
    ]
    graph = helper.make_graph(
        nodes,
        "core",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, T]),
            helper.make_tensor_value_info("e2", TensorProto.FLOAT, [1, T, D]),
        ],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, T, H]),
            helper.make_tensor_value_info("yi", TensorProto.INT32, [1, T, H]),
            helper.make_tensor_value_info("ydq", TensorProto.FLOAT, [1, T, H]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds = {
        "ids": RNG.integers(0, V, size=(1, T), dtype=np.int64),
        "e2": RNG.standard_normal((1, T, D)).astype(np.float32),
    }
    return model, feeds


def nbits_model(bits: int) -> tuple[onnx.ModelProto, dict]:
    M, K, N, bs = 3, 64, 8, 32
    kb = K // bs
    blob = bs * bits // 8
    levels = 1 << bits
    q = RNG.integers(0, levels, size=(N, kb, bs), dtype=np.uint8)
    if bits == 8:
        packed = q
    else:  # two 4-bit values per byte, low nibble first
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    assert packed.shape == (N, kb, blob)
    scales = (RNG.random(N * kb).astype(np.float32) + 0.5) * 0.05
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "scales"],
        ["Y"],
        domain="com.microsoft",
        K=K,
        N=N,
        bits=bits,
        block_size=bs,
    )
    graph = helper.make_graph(
        [node],
        f"nbits{bits}",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [M, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 8
    a = RNG.standard_normal((M, K)).astype(np.float32)
    # numpy reference: default zero point = 2^(bits-1)
    wdq = (q.astype(np.float32) - levels // 2) * scales.reshape(N, kb, 1)
    ref = a @ wdq.reshape(N, K).T
    return model, {"A": a}, ref


def opset_model(opset: int) -> tuple[onnx.ModelProto, dict]:
    node = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph(
        [node],
        f"opset{opset}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = _ir_for(opset)
    return model, {"x": np.array([1.0, 2.0], dtype=np.float32)}


def save(out: str, name: str, model: onnx.ModelProto, feeds: dict, run: bool = True) -> None:
    import onnxruntime as ort

    path = os.path.join(out, f"{name}.onnx")
    onnx.save(model, path)
    arrays = {f"in_{k}": v for k, v in feeds.items()}
    if run:
        # out_*: default graph optimizations; ref_*: all optimizations disabled.
        # They differ on purpose for core.ydq: ORT >= 1.25 rewrites
        # DequantizeLinear(int8 const, per-axis) -> MatMul into a quantized
        # matmul (~0.7% relative error); the unoptimized graph is exact.
        for prefix, level in (
            ("out", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
            ("ref", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
        ):
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            for n, v in zip(names, sess.run(None, feeds)):
                arrays[f"{prefix}_{n}"] = v
    np.savez(os.path.join(out, f"{name}.npz"), **arrays)


def main() -> int:
    import onnxruntime as ort

    out = sys.argv[1] if len(sys.argv) > 1 else ".cache/devices/models"
    os.makedirs(out, exist_ok=True)
    model, feeds = core_model()
    onnx.checker.check_model(model)
    save(out, "core", model, feeds)
    # numpy reference for the per-axis DequantizeLinear branch
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    c = np.concatenate([init["emb"][feeds["ids"]], feeds["e2"]], axis=-1)
    ydq = c @ (init["wq_i8"].astype(np.float32) * init["wsc"])
    data = np.load(os.path.join(out, "core.npz"))
    for prefix in ("ref", "out"):
        err = float(np.abs(data[f"{prefix}_ydq"] - ydq).max() / np.abs(ydq).max())
        print(f"core.ydq ({prefix}): host ORT {ort.__version__} vs numpy rel diff={err:.2e}")
    for bits in (8, 4):
        model, feeds, ref = nbits_model(bits)
        save(out, f"nbits{bits}", model, feeds)
        got = np.load(os.path.join(out, f"nbits{bits}.npz"))["out_Y"]
        err = float(np.abs(got - ref).max())
        print(f"nbits{bits}: host ORT {ort.__version__} vs numpy max|diff|={err:.2e}")
        assert err < 1e-3, err
    for op in OPSET_RANGE:
        model, feeds = opset_model(op)
        try:
            save(out, f"opset_{op:02d}", model, feeds)
        except Exception as exc:  # host ORT may not know the newest opset either
            save(out, f"opset_{op:02d}", model, feeds, run=False)
            print(f"opset {op}: host ORT {ort.__version__} cannot load ({type(exc).__name__})")
    print(f"models written to {out} (host onnx {onnx.__version__}, ORT {ort.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
