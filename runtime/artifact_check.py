"""Check a Craft .onnx file against itself before anything is sized from what it says.

The file is untrusted. Its metadata claims a network (ModelSpec), special token ids and a
quantization scheme; the backends and --estimate size loops, buffers and ONNX Runtime's
bindings from those claims. check_file() holds every claim against the file itself first,
reading it with the bounded reader (craft.runtime.onnx_file: every length already checked
against the bytes present), every weight's header before any weight's data:

  ranges    every ModelSpec field in a sane range; n_kv_head divides n_head; head_dim even;
            special ids inside the vocabulary; a quantization scheme this runtime knows
  weights   every weight the spec implies is present with exactly the shape and dtype its
            scheme's layout gives (craft.runtime.weights); none of a layer the spec lacks
  graph     inputs and outputs are the contract's names for n_layer, the architecture
            (KV-cache pairs, or a recurrent file's states: craft.runtime.artifact) and the
            format version (logits_to_keep from 3 on, with its int64 (1,) default), with their
            element types, ranks and the fixed dims the spec implies; no other input has a
            default (ONNX Runtime would refuse to bind it)
  ops       every node (Scan's body included) is an operator of A.GRAPH_OPS, which Craft's graphs
            are made of: the graph is code that ONNX Runtime runs, and a Loop, an If or any other
            operator outside that list never reaches it
  values    a quantized file's float32 weights are finite (nonfinite_weight: the one check that reads
            weight data, a few percent of the file)
  size      at most entry_budget(spec) nodes (initializers, inputs, outputs alike) and
            STRUCTURE_BYTES_PER_LAYER * (n_layer + 1) bytes of graph structure: what ONNX
            Runtime turns into objects, so that a file of millions of tiny entries cannot make
            it allocate a hundred times the file's size

A Craft export has about 60 nodes (q4_1: 70) and 12 KB of structure per layer: the
budgets are twice that. Each failure is one ArtifactError line naming the file, what was
expected and found, and the fix.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Iterator

import numpy as np

from craft.runtime import artifact as A
from craft.runtime import weights as W
from craft.runtime.artifact import Artifact, ArtifactError, ModelSpec
from craft.runtime.onnx_file import Node, OnnxFormatError, OnnxModel, ValueInfo, read_metadata, read_model

NODES_PER_LAYER = 128  # nodes (and initializers, inputs, outputs) allowed per layer, one layer's worth for the rest
STRUCTURE_BYTES_PER_LAYER = 32 * 1024  # bytes of non-weight, non-metadata protobuf per layer, likewise

# the ranges a ModelSpec field may take (inclusive); beyond them no real model lies
RANGES = {
    "vocab_size": (1, 1 << 24),
    "dim": (1, 1 << 16),
    "n_layer": (1, 1024),
    "n_head": (1, 1024),
    "n_kv_head": (1, 1024),
    "head_dim": (2, 4096),
    "hidden_dim": (1, 1 << 20),
    "context_length": (1, 1 << 24),
}
INT64, FLOAT32 = 7, 1  # TensorProto element types of the contract's inputs and outputs
FIX = "re-export it with craft-export"


HEAD_FIELDS = ("n_head", "n_kv_head", "head_dim")  # attention's shape: checked for transformer files only


def entry_budget(spec: ModelSpec) -> int:
    """The most nodes, initializers, inputs or outputs (each) a file of this spec may have."""
    return NODES_PER_LAYER * (spec.n_layer + 1)


def spec_problem(spec: ModelSpec) -> str | None:
    """What is wrong with a (type-checked) spec's values, or None."""
    attention = spec.arch != A.RECURRENT  # a recurrent file's head fields are its config's, unused
    for name, (lo, hi) in RANGES.items():
        value = getattr(spec, name)
        if not lo <= value <= hi and (attention or name not in HEAD_FIELDS):
            return f"model config has {name}={value}, expected {lo}..{hi}"
    if attention and spec.n_head % spec.n_kv_head:
        return f"model config has n_head={spec.n_head}, not a multiple of n_kv_head={spec.n_kv_head}"
    if attention and spec.head_dim % 2:
        return f"model config has head_dim={spec.head_dim}, expected an even number (RoPE rotates pairs)"
    if not (math.isfinite(spec.rope_theta) and spec.rope_theta > 0):
        return f"model config has rope_theta={spec.rope_theta}, expected a positive number"
    if not (math.isfinite(spec.norm_eps) and 0 <= spec.norm_eps < 1):
        return f"model config has norm_eps={spec.norm_eps}, expected 0 <= norm_eps < 1"
    if spec.head_rotation and (spec.arch != A.LLAMA or not spec.tie_embeddings):
        return "model config has head_rotation=true, which only a transformer with a tied head has"
    if spec.ffn_rotation and spec.arch != A.LLAMA:
        return "model config has ffn_rotation=true, which only a transformer has"
    if spec.ffn_rotation and spec.hidden_dim % W.FFN_ROTATION_BLOCK:
        return (
            f"model config has ffn_rotation=true, which only a transformer whose hidden_dim is a multiple of "
            f"{W.FFN_ROTATION_BLOCK} has (hidden_dim={spec.hidden_dim})"
        )
    return None


def expected_weights(spec: ModelSpec, quantization: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of every stored weight a file of this spec and scheme has."""
    scheme = W.SCHEMES[quantization]
    out = {name: (shape, np.dtype(np.float32)) for name, shape in W.float_weights(spec).items()}
    for name, shape in W.scheme_weights(spec).items():
        stored_as = scheme.scheme_for(name)
        layout = stored_as.embedding_layout(shape) if name == W.EMBEDDING else stored_as.layout(shape)
        out.update(zip(stored_as.stored_names(name), layout, strict=True))
    return out


def expected_io(spec: ModelSpec, version: int) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Graph inputs and outputs of a file of this format version: name -> (element type, shape);
    None marks a dynamic dim."""
    inputs = {
        A.INPUT_IDS: (INT64, (None, None)),
        A.ATTENTION_MASK: (INT64, (None, None)),
        A.POSITION_IDS: (INT64, (None, None)),
    }
    if version >= A.LOGITS_TO_KEEP_VERSION:
        inputs[A.LOGITS_TO_KEEP] = (INT64, (1,))
    outputs = {A.LOGITS: (FLOAT32, (None, None, spec.vocab_size))}
    if spec.arch == A.RECURRENT:  # a state (B, dim) per layer in place of the key/value pairs
        inputs.update({A.past_state_name(i): (FLOAT32, (None, spec.dim)) for i in range(spec.n_layer)})
        outputs.update({A.present_state_name(i): (FLOAT32, (None, spec.dim)) for i in range(spec.n_layer)})
        return inputs, outputs
    kv = (FLOAT32, (None, spec.n_kv_head, None, spec.head_dim))
    for i in range(spec.n_layer):
        inputs.update(dict.fromkeys(A.past_names(i), kv))
        outputs.update(dict.fromkeys(A.present_names(i), kv))
    return inputs, outputs


def check_file(path: str | Path) -> Artifact:
    """The file's Craft metadata, checked against the file as described above; ArtifactError
    (one line) for anything else: not a file, not ONNX, not Craft, or any claim the file belies."""
    if not str(path):  # Path("") would be ".", the current directory
        raise ArtifactError("the model file's path is empty; pass the .onnx file from craft-export")
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if str(path) == "-":
            raise ArtifactError("a model is read from a file, not from stdin ('-'); pass the .onnx file") from None
        raise ArtifactError(
            f"model file {path} does not exist; export one with craft-export RUN_DIR -o {path}"
        ) from None
    except OSError as e:
        raise ArtifactError(f"cannot read model file {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ArtifactError(
            f"model file {path} is a directory; pass the .onnx file (craft-export RUN_DIR -o FILE.onnx writes one)"
        )
    if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end: not opened
        raise ArtifactError(
            f"model file {path} is not a regular file (a pipe or a device); pass the .onnx file from craft-export"
        )
    try:
        artifact = Artifact.from_metadata(read_metadata(path), source=str(path))
        problem = check_claims(artifact)
        if problem:
            raise ArtifactError(f"{path}: {problem}; {FIX}")
        model = read_model(path, with_weights=False, max_entries=entry_budget(artifact.spec))
        epsilons = norm_epsilons(path, model, entry_budget(artifact.spec))
    except OnnxFormatError as e:
        raise ArtifactError(f"{e}; is it a Craft model exported with craft-export?") from None
    except OSError as e:
        raise ArtifactError(f"cannot read model file {path}: {e.strerror}") from None
    problem = check_model(artifact, model)
    if problem is None:  # the numpy backend computes with the metadata's epsilon, ONNX Runtime with the graph's
        wanted = np.float32(artifact.spec.norm_eps)
        found = next((eps for eps in epsilons if np.float32(eps) != wanted), None)
        if found is not None:
            problem = f"its graph's RMS norms add epsilon {found:g}, its metadata says norm_eps={wanted:g}"
    if problem is None:
        try:
            problem = nonfinite_weight(path, artifact)
        except OnnxFormatError as e:
            raise ArtifactError(f"{e}; is it a Craft model exported with craft-export?") from None
        except OSError as e:
            raise ArtifactError(f"cannot read model file {path}: {e.strerror}") from None
    if problem:
        raise ArtifactError(f"{path}: {problem}; {FIX}")
    return artifact


def nonfinite_weight(path: Path, artifact: Artifact) -> str | None:
    """Which float32 weight of a quantized file (block scales and offsets, norms, RoPE tables) holds a
    NaN or an infinity, or None. There a NaN becomes an activation that MatMulNBits' int8 rounding turns
    into finite nonsense, which ONNX Runtime returns as logits; a float32 file's NaN reaches its logits,
    where both backends catch it. Read from the mapping, a few percent of an int8 file."""
    if artifact.quantization == "none":
        return None
    expected = expected_weights(artifact.spec, artifact.quantization)
    names = [name for name, (_, dtype) in expected.items() if dtype == np.float32]
    values = read_model(path, with_weights=names, with_nodes=False, max_entries=entry_budget(artifact.spec))
    for name in names:
        if not np.isfinite(values.initializers[name]).all():
            return f"weight '{name}' holds NaN or infinite values"
    return None


def file_identity(path: str | Path) -> tuple | None:
    """What changes when a file is replaced or rewritten (device, inode, size, mtime); None if it
    cannot be stat'ed (check_file says why)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_unchanged(path: str | Path, identity: tuple | None) -> None:
    """ArtifactError if the file at `path` is no longer the one `identity` was taken of: a backend
    that read it after check_file did would have loaded another file than the one checked (and its
    failure would be blamed on the export)."""
    if identity is not None and file_identity(path) != identity:
        raise ArtifactError(
            f"{path} changed while it was loading (rewritten or replaced); run again once it is written"
        )


FUSED_NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
FUSED_NORM_EPSILON = 1e-5  # ONNX Runtime's default for their epsilon attribute


def norm_epsilons(path: Path, model: OnnxModel, max_entries: int) -> list[float]:
    """The epsilon of every RMS norm written as craft-export writes them: the fused nodes' attribute,
    or the initializer that Add(ReduceMean(x^2), eps) adds before its Sqrt (read from the file).
    Another form (a swapped Add, a Constant node) is not recognised, so not checked."""
    found = [node.attributes.get("epsilon", FUSED_NORM_EPSILON) for node in model.nodes if node.op_type in FUSED_NORMS]
    made_by = {output: node for node in model.nodes for output in node.outputs}
    constants = []
    for node in model.nodes:
        add = made_by.get(node.inputs[0]) if node.op_type == "Sqrt" and node.inputs else None
        if add is not None and add.op_type == "Add" and len(add.inputs) == 2:
            mean = made_by.get(add.inputs[0])
            if mean is not None and mean.op_type == "ReduceMean":
                constants.append(add.inputs[1])
    if constants:
        values = read_model(path, with_weights=constants, with_nodes=False, max_entries=max_entries).initializers
        found += [float(values[name].reshape(-1)[0]) for name in constants if values.get(name, np.empty(0)).size == 1]
    return [eps if isinstance(eps, float) else math.nan for eps in found]  # a damaged attribute is no epsilon


def check_claims(artifact: Artifact) -> str | None:
    """What is wrong with the metadata on its own (ranges, ids, scheme), or None."""
    spec = artifact.spec
    problem = spec_problem(spec)
    if problem:
        return problem
    for name in ("bos_id", "eos_id", "pad_id"):
        value = getattr(artifact, name)
        if not 0 <= value < spec.vocab_size:
            return f"metadata has {name}={value}, outside the vocabulary 0..{spec.vocab_size - 1}"
    if artifact.quantization not in W.SCHEMES:
        return (
            f"its quantization '{artifact.quantization}' is unknown to this runtime (it knows {', '.join(W.SCHEMES)})"
        )
    return None


def check_model(artifact: Artifact, model: OnnxModel) -> str | None:
    """What the graph and its weights' headers belie of the metadata, or None."""
    spec = artifact.spec
    budget = STRUCTURE_BYTES_PER_LAYER * (spec.n_layer + 1)
    if model.structure_bytes > budget:
        return (
            f"its graph structure takes {model.structure_bytes} bytes, more than the {budget} "
            f"a model of {spec.n_layer} layers needs"
        )
    expected = expected_weights(spec, artifact.quantization)
    for name, (shape, dtype) in expected.items():
        info = model.tensors.get(name)
        if info is None:
            return (
                f"it lacks weight '{name}' that a model of its config "
                f"({spec.n_layer} layers, {artifact.quantization}) has"
            )
        if info.shape != shape or info.dtype != dtype:
            found = f"{info.dtype or f'type {info.data_type}'} {info.shape}"
            return f"weight '{name}' is {found}, the model config needs {dtype} {shape}"
    named = (W.EMBEDDING, W.HEAD, W.NORM, W.ROPE_COS, W.layer(0).wo, W.HEAD_ROTATION, W.FFN_ROTATION)
    roots = {name.split(".")[0] for name in named}
    for name in model.tensors:
        if name.split(".")[0] in roots and name not in expected:
            return (
                f"it has weight '{name}' that a model of its config "
                f"({spec.n_layer} layers, {artifact.quantization}) lacks"
            )
    unknown = next((node for node in graph_nodes(model.nodes) if (node.domain, node.op_type) not in A.GRAPH_OPS), None)
    if unknown is not None:
        op = f"{unknown.op_type[:60]!r}{domain_of(unknown)}"
        return f"its graph has a node of operator {op}, which no Craft graph uses"
    fused = any(node.op_type == "GroupQueryAttention" for node in model.nodes)
    if fused != (artifact.attention == A.ATTENTION_INPLACE):  # the backends feed the two kinds differently
        found = "has" if fused else "has no"
        return f"its graph {found} GroupQueryAttention, yet its metadata says {A.META_ATTENTION}={artifact.attention}"
    inputs, outputs = expected_io(spec, artifact.format_version)
    return (
        io_problem("input", model.inputs, inputs, spec.n_layer)
        or io_problem("output", model.outputs, outputs, spec.n_layer)
        or defaults_problem(model, inputs)
    )


def graph_nodes(nodes) -> Iterator[Node]:
    """Every node of a graph, those of its nodes' subgraphs (Scan's body) included."""
    for node in nodes:
        yield node
        for value in node.attributes.values():
            if isinstance(value, tuple):  # a GRAPH attribute
                yield from graph_nodes(value)
            elif isinstance(value, list) and value and isinstance(value[0], tuple):  # GRAPHS
                for graph in value:
                    yield from graph_nodes(graph)


def domain_of(node: Node) -> str:
    return f" (domain {node.domain[:60]!r})" if node.domain else ""


def defaults_problem(model: OnnxModel, inputs: dict[str, tuple]) -> str | None:
    """Whether the graph's input defaults (initializers named like an input) are what the format
    has: logits_to_keep's int64 (1,) from version 3 on, and no other. Craft writes no sparse
    initializers; ONNX Runtime would take one named like an input as its default too."""
    if model.sparse_initializer_count:
        return "its graph has sparse initializers, which the Craft format does not use"
    for name in inputs.keys() & model.tensors.keys():
        info = model.tensors[name]
        if name != A.LOGITS_TO_KEEP:
            return f"its graph input '{name}' has a default value, which the Craft format does not define"
        if info.shape != (1,) or info.dtype != np.dtype(np.int64):
            found = f"{info.dtype or f'type {info.data_type}'} {info.shape}"
            return f"the default of graph input '{name}' is {found}, the format needs int64 (1,)"
    if A.LOGITS_TO_KEEP in inputs and A.LOGITS_TO_KEEP not in model.tensors:
        return (
            f"its graph input '{A.LOGITS_TO_KEEP}' has no default value ([0]: every position), "
            f"which format version {A.LOGITS_TO_KEEP_VERSION} requires"
        )
    return None


def io_problem(kind: str, found: list[ValueInfo], expected: dict[str, tuple], n_layer: int) -> str | None:
    """Whether graph inputs (or outputs) are exactly the expected names, types and dims."""
    names = [v.name for v in found]
    if sorted(names) != sorted(expected):
        missing, extra = sorted(expected.keys() - set(names)), sorted(set(names) - expected.keys())
        what = f"lacks {missing[:3]}" if missing else f"has {extra[:3]} besides" if extra else "repeats names in"
        return f"its graph {what} the {kind}s the Craft format defines for {n_layer} layers"
    for value in found:
        elem_type, shape = expected[value.name]
        fits = len(value.shape) == len(shape) and all(
            not isinstance(d, int) if e is None else (d == e or not isinstance(d, int))
            for d, e in zip(value.shape, shape)
        )
        if value.elem_type != elem_type or not fits:
            want = tuple("?" if e is None else e for e in shape)
            return (
                f"graph {kind} '{value.name}' is type {value.elem_type} {value.shape}, "
                f"the model config needs type {elem_type} {want}"
            )
    return None
