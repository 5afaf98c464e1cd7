"""Hostile .onnx files: the runtime's promise is one line naming the problem and exit 2 - never a
traceback, never a hang, never wrong text from a file that lies, never memory sized from a claim.

Damaged copies of a real tiny export (byte flips, truncations) run through craft-run's own
entry point on both backends and --estimate, in a child process with a timeout; metadata that
lies about the network is checked against the weights and the graph; files built to blow up
memory (huge claimed context or layers, millions of empty nodes, packed data lying about its
size) must be refused within 2x the file's size plus a fixed baseline of peak RSS.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run_cli
from craft.runtime import artifact as A
from craft.runtime import weights as W
from craft.runtime.artifact import ArtifactError
from craft.runtime.generator import Generator, load_artifact

BACKENDS = ("ort", "numpy")
BASELINE_MB = 100  # a child that imports the runtime and loads a tiny model: numpy, onnxruntime, the interpreter


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny GQA model with random weights (vocab 300, dim 64, 2 layers, 4 heads / 2 kv heads,
    context 64) exported tied as int8 (standard and in-place attention: craft-export's default for
    it), untied as float32 and untied as q4_1 (zero points, offsets, an int8 head): every layout,
    both head layouts, both caches. It poses as an import, so that the int8 files have what only
    imports have (a head rotation, w2's input turned)."""
    import dataclasses

    from craft.config import ModelConfig
    from craft.export.exporter import build_model_proto, random_run

    folder = tmp_path_factory.mktemp("hostile")
    out = {}
    for name, quantize, tie, attention in (
        ("int8", "int8", True, "standard"),
        ("int8_inplace", "int8", True, "inplace"),
        ("fp32", "none", False, "standard"),
        ("q4_1", "q4_1", False, "inplace"),
    ):
        cfg = ModelConfig(
            vocab_size=300, dim=64, n_layer=2, n_head=4, n_kv_head=2, context_length=64, tie_embeddings=tie
        )
        out[name] = folder / f"tiny.{name}.onnx"
        run = dataclasses.replace(random_run(cfg), source_kind="hf")
        out[name].write_bytes(build_model_proto(run, quantize, attention=attention)[0].SerializeToString())
    return out


def raw_spans(path: Path) -> list[tuple[int, int]]:
    """Where the weights' raw_data lie in the file (the rest is structure and metadata)."""
    content = path.read_bytes()
    spans = []
    for tensor in onnx.load(str(path)).graph.initializer:
        if len(tensor.raw_data) >= 16:
            start = content.find(tensor.raw_data)
            spans.append((start, start + len(tensor.raw_data)))
    return spans


# --- a child process drives craft-run's entry point over many damaged copies ------------------

WORKER = textwrap.dedent("""
    import contextlib, io, json, sys, traceback
    import numpy as np
    from craft.runtime.cli import main

    def cli(args):
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                main(args)
            except SystemExit as e:
                return e.code, err.getvalue()
        return "no exit", err.getvalue()

    job = json.loads(sys.argv[1])
    original = open(job["source"], "rb").read()
    structure = np.ones(len(original), bool)
    for a, b in job["raw"]:
        structure[a:b] = False
    structure = np.flatnonzero(structure)
    summary = {"ran": 0, "refused": 0, "failures": [], "messages": []}
    for case in range(job["cases"]):
        rng = np.random.default_rng([job["seed"], case])
        content = bytearray(original)
        if job["kind"] == "flip":  # 1-4 bytes, half of them in the graph structure and metadata
            for _ in range(rng.integers(1, 5)):
                where = structure if rng.random() < 0.5 else np.arange(len(content))
                content[rng.choice(where)] ^= int(rng.integers(1, 256))
        else:  # truncation at an offset spread over the file, the tail more densely
            content = content[: int(len(content) * (case + rng.random()) / job["cases"])]
        open(job["path"], "wb").write(bytes(content))
        print("case", case, flush=True)  # the last one printed names a hang or a crash
        runs = [[job["path"], "ab", "-n", "3", "--backend", b] + (["-t", "0"] if case % 2 else ["--seed", "1"])
                for b in job["backends"]] + [[job["path"], "--estimate"]]
        for args in runs:
            try:
                code, err = cli(args)
            except BaseException:
                summary["failures"].append([case, args[1:], traceback.format_exc()[-1500:]])
                continue
            one_line = code == 2 and err.startswith("craft-run: error: ") and err.count("\\n") == 1
            if code == 0 and "Traceback" not in err:
                summary["ran"] += 1
            elif one_line:
                summary["refused"] += 1
                summary["messages"].append(err.strip()[:160])
            else:
                summary["failures"].append([case, args[1:], code, err[-1500:]])
    print("SUMMARY", json.dumps(summary))
""")


def damage(tmp_path: Path, source: Path, kind: str, cases: int, seed: int, backends=BACKENDS) -> dict:
    job = dict(
        source=str(source),
        path=str(tmp_path / "damaged.onnx"),
        raw=raw_spans(source),
        kind=kind,
        cases=cases,
        seed=seed,
        backends=list(backends),
    )
    result = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(job)], capture_output=True, text=True, timeout=60 + cases
    )
    last = [line for line in result.stdout.splitlines() if line.startswith("case")][-1:]
    assert result.returncode == 0, f"worker died at {last}: {result.stderr[-3000:]}"
    summary = json.loads(result.stdout.split("SUMMARY ", 1)[1])
    assert not summary["failures"], json.dumps(summary["failures"][:3], indent=1)
    return summary


@pytest.mark.parametrize("name", ["int8", "int8_inplace", "fp32", "q4_1"])
def test_byte_flips_run_or_get_one_line(tmp_path, files, name):
    """200 copies of the file with 1-4 bytes flipped, each through craft-run on both backends
    and --estimate: every outcome is a run (exit 0) or one line and exit 2."""
    summary = damage(tmp_path, files[name], "flip", cases=60 if name == "fp32" else 200, seed=1)
    assert summary["ran"] > 0 and summary["refused"] > 0, summary  # both outcomes were exercised
    assert not any("Traceback" in m or "\n" in m for m in summary["messages"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int8", "int8_inplace", "fp32"])
def test_many_byte_flips_run_or_get_one_line(tmp_path, files, name):
    summary = damage(tmp_path, files[name], "flip", cases=1000, seed=3)
    assert summary["ran"] > 0 and summary["refused"] > 0, summary


def test_truncations_are_refused_in_one_line(tmp_path, files):
    summary = damage(tmp_path, files["int8"], "truncate", cases=60, seed=2)
    assert summary["ran"] == 0 and summary["refused"] == 60 * 3, summary  # a cut file never runs


# --- metadata that lies, checked against the weights and the graph ------------------------------


def rewrite(source: Path, target: Path, spec: dict | None = None, graph=None, **metadata: str) -> Path:
    """A copy of `source` with ModelSpec fields (spec), metadata values or the graph changed."""
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    if spec is not None:
        props[A.META_CONFIG] = json.dumps({**json.loads(props[A.META_CONFIG]), **spec})
    props.update(metadata)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    if graph is not None:
        graph(model.graph)
    target.write_bytes(model.SerializeToString())
    return target


def refused(path: Path, pattern: str) -> None:
    """load_artifact (what --estimate reads) and both backends refuse with one ArtifactError line."""
    with pytest.raises(ArtifactError, match=pattern) as error:
        load_artifact(path)
    assert "\n" not in str(error.value) and str(error.value).startswith(str(path))
    for backend in BACKENDS:
        with pytest.raises(ArtifactError, match=pattern):
            Generator(path, backend=backend)


SPEC_LIES = [  # (field changes, what the message names); the tiny file has 2 layers, 4/2 heads of 16, vocab 300
    (
        {"n_layer": 1},
        "has weight 'layers.1.*' that a model of its config \\(1 layers",
    ),  # 1 layer of 2: no silent wrong text
    ({"n_layer": 3}, "lacks weight 'layers.2."),
    ({"n_layer": 1_000_000}, "n_layer=1000000, expected 1..1024"),
    ({"n_head": 8}, "wqkv.weight.* the model config needs"),
    ({"n_head": 3}, "n_head=3, not a multiple of n_kv_head=2"),
    ({"n_kv_head": 4}, "wqkv.weight.* the model config needs"),
    ({"n_kv_head": 0}, "n_kv_head=0, expected 1..1024"),
    ({"head_dim": 32}, "the model config needs"),
    ({"head_dim": 15}, "head_dim=15, expected an even number"),
    ({"dim": 65}, "the model config needs"),
    ({"hidden_dim": 160}, "w13.weight.* the model config needs"),
    ({"vocab_size": 301}, "tok_embeddings.weight.* the model config needs"),
    ({"vocab_size": 1 << 30}, "vocab_size=1073741824, expected"),
    (
        {"context_length": 128},
        "rope.cos' is float32 \\(64, 16\\), the model config needs float32 \\(128, 16\\)",
    ),  # beyond the RoPE table
    ({"context_length": 32}, "rope.cos"),
    ({"context_length": 1 << 40}, "context_length=1099511627776, expected"),
    ({"tie_embeddings": False}, "head_rotation=true, which only a transformer with a tied head has"),
    ({"tie_embeddings": False, "head_rotation": False}, "lacks weight 'output.weight"),
    ({"head_rotation": False}, "has weight 'head_rotation' that a model of its config"),
    ({"head_rotation": 1}, "head_rotation=1, expected bool"),
    ({"ffn_rotation": False}, "has weight 'ffn_rotation' that a model of its config"),
    ({"ffn_rotation": 1}, "ffn_rotation=1, expected bool"),
    ({"hidden_dim": 176}, "ffn_rotation=true, which only a transformer whose hidden_dim is a multiple of 32 has"),
    ({"dim": float("inf")}, "dim=Infinity, expected int"),
    ({"rope_theta": -1.0}, "rope_theta=-1.0"),
    ({"norm_eps": float("nan")}, "norm_eps=nan"),
    ({"norm_eps": 0.9}, "its graph's RMS norms add epsilon 1e-05, its metadata says norm_eps=0.9"),  # numpy used it
    ({"n_layer": "2"}, 'n_layer="2", expected int'),
    ({"n_layer": True}, "n_layer=true, expected int"),
    ({"n_layer": 2.0}, "n_layer=2.0, expected int"),
    ({"tie_embeddings": 1}, "tie_embeddings=1, expected bool"),
]


@pytest.mark.parametrize("changes, pattern", SPEC_LIES, ids=lambda v: json.dumps(v) if isinstance(v, dict) else "")
def test_model_config_lies_are_refused(tmp_path, files, changes, pattern):
    refused(rewrite(files["int8"], tmp_path / "lie.onnx", spec=changes), pattern)


@pytest.mark.parametrize(
    "key, value, pattern",
    [
        (A.META_BOS, "-1", "bos_id=-1, outside the vocabulary 0..299"),
        (A.META_EOS, "300", "eos_id=300, outside the vocabulary"),
        (A.META_PAD, str(1 << 62), "pad_id=4611686018427387904, outside"),
        (A.META_QUANT, "none", "lacks weight 'tok_embeddings.weight'"),
        (A.META_QUANT, "int3", "quantization 'int3' is unknown"),
        (A.META_ATTENTION, "inplace", "its graph has no GroupQueryAttention, yet its metadata says craft.attention"),
        (A.META_FORMAT, "1", "head_rotation, which format version 1 does not have"),  # an old runtime would skip it
        (A.META_FORMAT, "3", "ffn_rotation, which format version 3 does not have"),
        (A.META_CONFIG, "[1, 2]", "model config in the file is a JSON list"),
        (A.META_CONFIG, "[" * 100_000 + "]" * 100_000, "malformed Craft metadata"),
    ],
)
def test_metadata_lies_are_refused(tmp_path, files, key, value, pattern):
    refused(rewrite(files["int8"], tmp_path / "lie.onnx", **{key: value}), pattern)


def test_foreign_graph_with_craft_metadata_is_refused(tmp_path, files):
    from onnx import TensorProto, helper, numpy_helper

    foreign = helper.make_model(
        helper.make_graph(
            [helper.make_node("Gemm", ["x", "w"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
            [numpy_helper.from_array(np.ones((4, 2), np.float32), "w")],
        )
    )
    onnx.helper.set_model_props(foreign, {p.key: p.value for p in onnx.load(str(files["int8"])).metadata_props})
    (tmp_path / "foreign.onnx").write_bytes(foreign.SerializeToString())
    refused(tmp_path / "foreign.onnx", "lacks weight 'norm.weight'")


def test_graph_io_that_is_not_the_contracts_is_refused(tmp_path, files):
    def rename_past(graph):
        graph.input[4].name = "past.0.key"

    def float_keep(graph):  # logits_to_keep, the fourth input
        graph.input[3].type.tensor_type.elem_type = onnx.TensorProto.FLOAT

    def static_kv_heads(graph):
        graph.output[1].type.tensor_type.shape.dim[1].dim_value = 3

    def int32_ids(graph):
        graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT32

    refused(
        rewrite(files["int8"], tmp_path / "a.onnx", graph=rename_past),
        "its graph lacks \\['past_key_values.0.key'\\] the inputs",
    )
    refused(
        rewrite(files["int8"], tmp_path / "b.onnx", graph=static_kv_heads),
        "graph output 'present.0.key' is type 1 \\('batch', 3,",
    )
    refused(rewrite(files["int8"], tmp_path / "c.onnx", graph=int32_ids), "graph input 'input_ids' is type 6")
    refused(rewrite(files["int8"], tmp_path / "d.onnx", graph=float_keep), "graph input 'logits_to_keep' is type 1")


@pytest.mark.parametrize(
    "op, attribute, value",
    [
        ("GroupQueryAttention", "kv_num_heads", 0),  # ONNX Runtime would divide by it
        ("GroupQueryAttention", "num_heads", 3),
        ("GroupQueryAttention", "num_heads", 1 << 30),
        ("GatherBlockQuantized", "block_size", 0),
        ("GatherBlockQuantized", "bits", 4),
        ("MatMulNBits", "K", 0),
        ("MatMulNBits", "N", 1),
        ("SkipSimplifiedLayerNormalization", "epsilon", -1.0),
    ],
)
def test_fused_node_attribute_lies_are_one_line(tmp_path, files, op, attribute, value):
    """The in-place file's com.microsoft nodes with one attribute changed: ONNX Runtime refuses
    the file, and the line says the file is damaged, not that onnxruntime is too old."""

    def lie(graph):
        node = next(n for n in graph.node if n.op_type == op)
        a = next(a for a in node.attribute if a.name == attribute)
        a.i, a.f = (value, a.f) if isinstance(value, int) else (a.i, value)

    path = rewrite(files["int8_inplace"], tmp_path / "lie.onnx", graph=lie)
    said = "RMS norms add epsilon -1, its metadata says" if attribute == "epsilon" else "ONNX Runtime cannot load it"
    with pytest.raises(ArtifactError, match=said) as error:  # an epsilon is checked before ONNX Runtime sees it
        Generator(path, backend="ort")
    assert "\n" not in str(error.value)
    result = run_cli("craft.runtime.cli", str(path), "hi", "-n", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and said in result.stderr


def graph_with(extra_nodes, initializers=()):
    """A `rewrite` graph edit that appends nodes (and initializers); unconnected nodes are enough:
    the op check reads every node, Scan's body included, before ONNX Runtime sees the file."""

    def edit(graph):
        graph.node.extend(extra_nodes)
        graph.initializer.extend(initializers)

    return edit


def test_operators_craft_never_writes_are_refused_on_both_backends(tmp_path, files):
    """The graph is code ONNX Runtime runs. A Loop of 10^15 iterations hung craft-run; a ConstantOfShape
    of 20000 x 20000 took 1.6 GB from a 0.6 MB file; an If branch read data from a file beside the model;
    a changed op type ran on numpy (which ignores the graph) and failed on ONNX Runtime. Every node's
    operator must be one of the contract's (A.GRAPH_OPS), subgraphs included, on both backends."""
    from onnx import TensorProto, helper, numpy_helper

    def misspell(graph):
        graph.node[5].op_type = graph.node[5].op_type[:-1] + "X"

    value = helper.make_tensor_value_info
    INT64, BOOL, FLOAT = TensorProto.INT64, TensorProto.BOOL, TensorProto.FLOAT
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [value("i", INT64, []), value("c_in", BOOL, []), value("v_in", FLOAT, None)],
        [value("c_out", BOOL, []), value("v_out", FLOAT, None)],
    )
    loop = helper.make_node("Loop", ["trip", "cond", "logits_raw"], ["looped"], body=body)
    trip = [numpy_helper.from_array(np.array(10**15), "trip"), numpy_helper.from_array(np.array(True), "cond")]
    scan_body = helper.make_graph(  # a Scan (which recurrent files use) whose body holds the Loop
        [helper.make_node("Loop", ["trip", "cond", "s"], ["t"], body=body)],
        "scan_body",
        [value("s", FLOAT, [1])],
        [value("t", FLOAT, [1])],
    )
    scan = helper.make_node("Scan", ["x"], ["y"], body=scan_body, num_scan_inputs=1)
    big = helper.make_node("ConstantOfShape", ["shape"], ["zeros"])
    shape = [numpy_helper.from_array(np.array([20000, 20000], np.int64), "shape")]
    outside = TensorProto(name="outside", data_type=FLOAT, dims=[1 << 20], data_location=TensorProto.EXTERNAL)
    outside.external_data.add(key="location", value="secret.bin")
    (tmp_path / "secret.bin").write_bytes(bytes(4 << 20))
    branch = helper.make_graph([], "branch", [], [value("outside", FLOAT, [1 << 20])], [outside])
    reads_beside = helper.make_node("If", ["cond"], ["read"], then_branch=branch, else_branch=branch)
    nested = b""  # 2000 NodeProto.attribute -> AttributeProto(type GRAPH).g -> GraphProto.node -> ...
    for _ in range(2000):
        nested = field(5, field(6, field(1, nested)) + varint(20 << 3) + varint(5))
    (tmp_path / "nested.onnx").write_bytes(
        inject_into_graph(files["int8"].read_bytes(), field(1, field(4, b"Identity") + nested))
    )
    cases = [
        (rewrite(files["int8"], tmp_path / "op.onnx", graph=misspell), "operator '[A-Za-z]+X', which no Craft graph"),
        (rewrite(files["int8"], tmp_path / "loop.onnx", graph=graph_with([loop], trip)), "operator 'Loop', which"),
        (rewrite(files["int8_inplace"], tmp_path / "scan.onnx", graph=graph_with([scan], trip)), "operator 'Loop'"),
        (rewrite(files["fp32"], tmp_path / "big.onnx", graph=graph_with([big], shape)), "operator 'ConstantOfShape'"),
        (rewrite(files["q4_1"], tmp_path / "if.onnx", graph=graph_with([reads_beside], trip)), "'outside' keeps its"),
        (tmp_path / "nested.onnx", "graphs nested more than 4 deep"),
    ]
    for path, pattern in cases:
        refused(path, pattern)
    for path, pattern in cases[1::4]:
        result = run_cli("craft.runtime.cli", str(path), "hi", "-n", "2")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert re.search(pattern, result.stderr) and result.stdout == ""


def test_a_graph_that_asks_for_more_memory_than_there_is_gets_one_line(tmp_path, files):
    """The checks read a graph's operators, not its wiring: a Range whose limit a constant raised to 3e9
    asked ONNX Runtime for 24 GB at the first step, from a 0.2 MB file, and took the machine's memory
    for a minute. Every session allocates from one arena capped at the memory available: one line,
    exit 1, at once. (The child runs under an address-space limit, so that a cap that failed cannot
    swamp the machine: the allocation then fails with another message.)"""
    import resource

    from onnx import helper, numpy_helper

    def raise_a_range(graph):
        node = next(n for n in graph.node if n.op_type == "Range")
        graph.initializer.append(numpy_helper.from_array(np.array(3 * 10**12, np.int64), "more"))
        graph.node.insert(list(graph.node).index(node), helper.make_node("Add", [node.input[1], "more"], ["raised"]))
        node.input[1] = "raised"

    path = rewrite(files["fp32"], tmp_path / "range.onnx", graph=raise_a_range)
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # noqa: E731
    result = subprocess.run(
        [sys.executable, "-m", "craft.runtime.cli", str(path), "hi", "-n", "2"],
        capture_output=True, text=True, timeout=120, preexec_fn=limit,
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    asked = r"ONNX Runtime was asked for [\d,.]+ GB for this step, more than the [\d,.]+ GB left"
    assert re.search(asked, result.stderr), result.stderr


def slow_graph(graph, side: int = 4096, products: int = 16) -> None:
    """A `rewrite` edit: the logits plus a sum over `products` chained (side x side) MatMuls of a Range,
    all allowed operators: ~20 s of one native ONNX Runtime call, under the memory cap."""
    from onnx import helper, numpy_helper

    producer = next(node for node in graph.node if A.LOGITS in node.output)
    producer.output[list(producer.output).index(A.LOGITS)] = "logits_before"
    constants = {"zero": 0, "count": side * side, "one": 1, "square": [side, side], "small": np.float32(1e-9)}
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.array(v).dtype), k) for k, v in constants.items())
    nodes = [
        helper.make_node("Range", ["zero", "count", "one"], ["ramp"]),
        helper.make_node("Cast", ["ramp"], ["ramp_f"], to=1),
        helper.make_node("Reshape", ["ramp_f", "square"], ["square_f"]),
        helper.make_node("Mul", ["square_f", "small"], ["m0"]),
    ]
    nodes += [helper.make_node("MatMul", [f"m{k}", "m0"], [f"m{k + 1}"]) for k in range(products)]
    nodes += [
        helper.make_node("ReduceSum", [f"m{products}"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "small"], ["nudge"]),
        helper.make_node("Add", ["logits_before", "nudge"], [A.LOGITS]),
    ]
    graph.node.extend(nodes)


@pytest.mark.parametrize("signals, code, said", [((signal.SIGTERM,), 143, "craft-run: terminated"),
                                                 ((signal.SIGINT, signal.SIGINT), 130, "interrupted")])  # fmt: skip
def test_a_signal_ends_craft_run_inside_a_long_native_call(tmp_path, files, signals, code, said):
    """Python runs a signal's handler only when the main thread is back in Python: inside ONNX
    Runtime's run of a slow crafted graph, SIGTERM did nothing (a Loop of 10^12 iterations ran until
    SIGKILL). Now a SIGTERM unhandled after 3 s, or a second Ctrl-C before the first was handled,
    ends craft-run with the usual line and code."""
    path = rewrite(files["fp32"], tmp_path / "slow.onnx", graph=slow_graph)
    proc = subprocess.Popen(
        [sys.executable, "-m", "craft.runtime.cli", str(path), "hi", "-n", "2", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(3)  # loaded, and inside the first step's run (~20 s)
        assert proc.poll() is None, proc.communicate()
        sent = time.monotonic()
        for signum in signals:
            proc.send_signal(signum)
            time.sleep(0.3)
        _, err = proc.communicate(timeout=15)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == code and err.strip().endswith(said) and took < 8, (proc.returncode, err, took)


def test_graph_ops_are_what_the_exporter_writes():
    """A.GRAPH_OPS is every operator of every exported variant (schemes x attentions x architectures,
    Scan's body included), plus the two that only earlier versions wrote: a new op in the exporter
    fails here before a file of it is refused by the runtime."""
    from craft.config import ModelConfig
    from craft.export.exporter import build_model_proto, random_run
    from craft.runtime.weights import SCHEMES

    written = set()

    def collect(graph):
        for node in graph.node:
            written.add((node.domain, node.op_type))
            for attribute in node.attribute:
                for sub in [attribute.g] * attribute.HasField("g") + list(attribute.graphs):
                    collect(sub)

    shape = {"vocab_size": 300, "dim": 64, "n_layer": 2, "context_length": 32}
    for cfg, attentions in (
        (ModelConfig(**shape, n_head=4, n_kv_head=2, tie_embeddings=True), A.ATTENTIONS),
        (ModelConfig(**shape, n_head=4, n_kv_head=4, tie_embeddings=False), A.ATTENTIONS),
        (ModelConfig(**shape, arch=A.RECURRENT), (A.ATTENTION_STANDARD,)),
    ):
        run = random_run(cfg)
        for quantize in SCHEMES:
            for attention in attentions:
                collect(build_model_proto(run, quantize, attention=attention)[0].graph)
    assert written <= A.GRAPH_OPS, written - A.GRAPH_OPS
    assert A.GRAPH_OPS - written == {("", "Mod"), ("", "Pad")}


def test_non_finite_float_weights_of_a_quantized_file_are_refused(tmp_path, files):
    """A NaN in an int8 file's norm weight or block scale became an activation that MatMulNBits' int8
    rounding made finite: ONNX Runtime printed text where the numpy backend refused the logits."""
    from onnx import numpy_helper

    def poison(name, value):
        def edit(graph):
            tensor = next(t for t in graph.initializer if t.name == name)
            array = numpy_helper.to_array(tensor).copy()
            array.flat[0] = value
            tensor.CopyFrom(numpy_helper.from_array(array, name))

        return edit

    for source, name, value in (
        ("int8", "layers.0.attention_norm.weight", np.nan),
        ("int8_inplace", "layers.1.feed_forward.w2.weight.scale", np.inf),
        ("q4_1", "layers.0.attention.wo.weight.offset", np.nan),
    ):
        path = rewrite(files[source], tmp_path / f"{source}.onnx", graph=poison(name, value))
        refused(path, f"weight '{re.escape(name)}' holds NaN or infinite values")


def test_finite_weights_that_overflow_the_network_are_refused_on_both_backends(tmp_path, files):
    """w2's input rotation of 3e38s (finite, so the file's checks pass): ONNX Runtime's logits are
    NaN, while numpy's RMS norm of the infinite residual is 0 and so is every logit - it printed an
    empty text with exit 0. An all-equal first row of logits is refused like a non-finite one."""
    from onnx import numpy_helper

    from craft.runtime.sampling import LogitsError, SamplingParams

    def overflow(graph):
        tensor = next(t for t in graph.initializer if t.name == W.FFN_ROTATION)
        tensor.CopyFrom(numpy_helper.from_array(np.full((32, 32), 3e38, np.float32), W.FFN_ROTATION))

    path = rewrite(files["int8"], tmp_path / "overflow.onnx", graph=overflow)
    for backend in BACKENDS:
        with pytest.raises(LogitsError, match="logits (are not finite|are all equal)"):
            Generator(path, backend=backend).generate("ab", SamplingParams(temperature=0, max_new_tokens=4))
    result = run_cli("craft.runtime.cli", str(path), "ab", "-n", "4", "--backend", "numpy")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "are all equal" in result.stderr, (
        result.returncode,
        result.stderr,
    )


# --- memory: hostile files are refused before anything is sized from them ----------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def inject_into_graph(content: bytes, extra: bytes) -> bytes:
    """The model with `extra` (GraphProto fields) appended to its graph: the graph is field 7,
    re-encoded with its new length; every other top-level field is kept byte for byte."""
    model = onnx.load_from_string(content)
    graph = model.graph.SerializeToString() + extra
    model.ClearField("graph")
    return model.SerializeToString() + field(7, graph)


def hostile_files(folder: Path, source: Path) -> dict[str, Path]:
    original = source.read_bytes()
    lying = (
        field(1, varint(100_000_000))
        + varint(2 << 3)
        + varint(7)
        + field(8, b"const_lie")
        + field(7, b"\x01" * 5_000_000)
    )
    honest = (
        field(1, varint(5_000_000))
        + varint(2 << 3)
        + varint(7)
        + field(8, b"const_big")
        + field(7, b"\x01" * 5_000_000)
    )
    contents = {
        "huge_context": rewrite(source, folder / "c.onnx", spec={"context_length": 1 << 24}).read_bytes(),
        "huge_layers": rewrite(source, folder / "l.onnx", spec={"n_layer": 1024}).read_bytes(),
        "million_layers": rewrite(source, folder / "m.onnx", spec={"n_layer": 5_000_000}).read_bytes(),
        "empty_nodes": inject_into_graph(original, b"\x0a\x00" * 2_000_000),
        "empty_inputs": inject_into_graph(original, b"\x5a\x00" * 2_000_000),
        "lying_packed_tensor": inject_into_graph(original, field(5, lying)),
        "big_typed_tensor": inject_into_graph(original, field(5, honest)),
        "million_metadata": original
        + b"".join(field(14, field(1, str(i).encode()) + field(2, b"")) for i in range(500_000)),
    }
    out = {}
    for name, content in contents.items():
        out[name] = folder / f"{name}.onnx"
        out[name].write_bytes(content)
    return out


PEAK_RSS = textwrap.dedent("""
    import json, sys
    from craft.runtime.artifact import ArtifactError
    from craft.runtime.generator import Generator, load_artifact
    from craft.runtime.sampling import SamplingParams

    def peak_mb():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024

    backend, out = sys.argv[1], {}
    Generator(sys.argv[2], backend="numpy" if backend == "estimate" else backend)  # the baseline: a loaded runtime
    for path in sys.argv[3:]:
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak to the current RSS
            f.write("5")
        try:
            if backend == "estimate":
                load_artifact(path)
            else:
                Generator(path, backend=backend).generate("ab", SamplingParams(max_new_tokens=3, temperature=0))
            outcome = "ran"
        except ArtifactError as e:
            outcome = str(e)
        out[path] = (outcome, peak_mb())
    print(json.dumps(out))
""")


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read (and reset) through /proc (Linux)"
)
def test_hostile_files_are_refused_within_bounded_memory(tmp_path, files):
    """Peak RSS while loading each file, per backend and for --estimate's read, stays under 2x
    the file's size + BASELINE_MB; and the file is refused in one line, naming its lie."""
    expected = {
        "huge_context": "rope.cos",
        "huge_layers": "lacks weight 'layers.2.",
        "million_layers": "n_layer=5000000",
        "empty_nodes": "more than 384 nodes",
        "empty_inputs": "more than 384 inputs",
        "lying_packed_tensor": "tensor 'const_lie' of shape \\(100000000,\\) has 5000000 values",
        "big_typed_tensor": "graph structure takes",
        "million_metadata": "more than 4096 metadata_props",
    }
    hostile = hostile_files(tmp_path, files["int8"])
    report = []
    for backend in ("ort", "numpy", "estimate"):
        result = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, backend, str(files["int8"]), *map(str, hostile.values())],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, (backend, result.stderr[-2000:])
        out = json.loads(result.stdout)
        for name, path in hostile.items():
            outcome, peak = out[str(path)]
            limit = 2 * path.stat().st_size / 2**20 + BASELINE_MB
            assert re.search(expected[name], outcome) and "\n" not in outcome, (name, backend, outcome)
            report.append(f"{name}/{backend}: {peak:.0f} MB (limit {limit:.0f})")
            assert peak < limit, report
    print("\n".join(report))


def test_cli_refuses_hostile_files_in_one_line(tmp_path, files):
    """End to end through craft-run (a real process): exit 2, one line, for a run and --estimate."""
    lie = rewrite(files["int8"], tmp_path / "one_layer.onnx", spec={"n_layer": 1})
    for args in ([str(lie), "hi", "--backend", "numpy"], [str(lie), "hi"], [str(lie), "--estimate"]):
        result = run_cli("craft.runtime.cli", *args)
        assert result.returncode == 2 and result.stdout == "", result
        assert re.fullmatch(
            r"craft-run: error: .*has weight 'layers\.1\..*re-export it with craft-export\n", result.stderr
        )


@pytest.mark.parametrize(
    "kind, data, pattern",
    [
        ("sentencepiece", b"", "malformed sentencepiece tokenizer: it is empty"),  # was sentencepiece's RuntimeError
        (
            "tokenizer.json",
            b'{"kind":"tokenizer.json","bos_id":1e400,"eos_id":2,"pad_id":2,"tokenizer":{"model":{}}}',
            "not a tokenizer.json tokenizer",
        ),  # int(1e400) raised OverflowError
    ],
)
def test_tokenizer_lies_are_refused(tmp_path, files, kind, data, pattern):
    import base64

    path = rewrite(
        files["int8"],
        tmp_path / "lie.onnx",
        **{A.META_TOKENIZER_KIND: kind, A.META_TOKENIZER: base64.b64encode(data).decode()},
    )
    for backend in BACKENDS:
        with pytest.raises(ArtifactError, match=pattern):
            Generator(path, backend=backend)
    estimate = run_cli("craft.runtime.cli", str(path), "--estimate")  # said 'fits yes' for a file that cannot run
    assert estimate.returncode == 2 and estimate.stderr.count("\n") == 1 and "does not load" in estimate.stderr


def test_in_place_graph_labelled_standard_is_refused(tmp_path, files):
    """The runtime feeds a left-padded batch to the two kinds of graph differently: an in-place file
    labelled standard gave silently wrong rows in a batch."""
    path = rewrite(files["int8_inplace"], tmp_path / "lie.onnx", **{A.META_ATTENTION: "standard"})
    refused(path, "its graph has GroupQueryAttention, yet its metadata says craft.attention=standard")


@pytest.mark.parametrize(
    "keys", [(A.META_FORMAT, A.META_VERSION), (A.META_QUANT,)], ids=["format version", "quantization"]
)
def test_hostile_metadata_text_reaches_the_terminal_escaped_and_short(tmp_path, files, keys):
    """A metadata value quoted in an error went to stderr raw and whole: an OSC sequence retitled the
    terminal, ESC[2K erased the line (a spoofed message), a U+202E reversed it, and 100 KB of it was
    one 100 KB line."""
    hostile = "9\x1b]0;TITLE\x07\x1b[2K\u202eevil\r" + "x" * 100_000
    path = rewrite(files["int8"], tmp_path / "m.onnx", **dict.fromkeys(keys, hostile))
    result = run_cli("craft.runtime.cli", str(path), "hi", "-n", "1")
    line = result.stderr.strip()
    assert result.returncode == 2 and line.startswith("craft-run: error:") and "\n" not in line, line[:300]
    assert not any(c in line for c in "\x1b\x07\r\u202e") and "\\x1b]0;TITLE\\x07" in line
    assert len(line) < 1200 and "characters ...]" in line
