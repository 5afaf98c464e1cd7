"""logits_to_keep (format version 3): a prefill asks the graph for its last position's logits alone,
so the head runs once per row instead of once per prompt token - on both attention kinds and the
recurrent graph, fed or not (its default keeps every position). Files of versions 1-2, which have
no such input, still run; a file whose version and inputs disagree is refused in one line."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from craft.runtime import artifact as A
from craft.runtime.artifact import ArtifactError
from craft.runtime.generator import Generator, load_artifact
from craft.runtime.sampling import SamplingParams

KINDS = ["standard", "inplace", "recurrent"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """kind -> the int8 file of one small random model (grouped-query heads for the transformer)."""
    from craft.config import ModelConfig
    from craft.export.exporter import build_model_proto, random_run

    folder = tmp_path_factory.mktemp("keep")
    shape = dict(vocab_size=300, dim=64, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=128, context_length=40)
    transformer, recurrent = random_run(ModelConfig(**shape)), random_run(ModelConfig(**shape, arch="recurrent"))
    out = {}
    for kind in KINDS:
        run, attention = (recurrent, A.ATTENTION_STANDARD) if kind == "recurrent" else (transformer, kind)
        out[kind] = folder / f"{kind}.onnx"
        out[kind].write_bytes(build_model_proto(run, "int8", attention=attention)[0].SerializeToString())
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_the_graph_computes_the_last_positions_asked_for(files, kind):
    from craft.export.verify import ort_forward

    ids = np.array([[5, 17, 3, 250, 9, 41, 7], [1, 2, 3, 4, 5, 6, 8]])
    session = ort.InferenceSession(str(files[kind]), providers=["CPUExecutionProvider"])
    spec = load_artifact(files[kind]).spec
    every = ort_forward(session, spec, ids, None)[0]  # not fed: the default keeps every position
    assert every.shape == (2, 7, 300)
    for keep, positions in ((0, 7), (1, 1), (3, 3), (50, 7)):
        logits = ort_forward(session, spec, ids, None, keep=keep)[0]
        assert logits.shape == (2, positions, 300), keep
        np.testing.assert_allclose(logits, every[:, 7 - positions :], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_last_only_prefill_equals_the_last_of_a_full_one(files, kind):
    """Through the backend, a left-padded batch included (the in-place file packs its rows to the
    left, so it keeps every position there and picks each row's last itself)."""
    backend = Generator(files[kind], threads=1).backend
    ids = np.array([[0, 0, 0, 12, 40, 7], [8, 9, 10, 11, 12, 13]])
    mask = np.array([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = A.position_ids(mask)
    backend.reset(2)
    full = backend.forward(ids, mask, positions)
    backend.reset(2)
    seen = []  # the logits the graph returned, before the backend picks the last position
    check = backend._check_logits
    backend._check_logits = lambda logits, *rest: (seen.append(logits.shape), check(logits, *rest))
    last = backend.forward(ids, mask, positions, last_only=True)
    del backend._check_logits
    assert seen == [(2, 6 if kind == "inplace" else 1, 300)]  # packed rows end in different columns
    assert last.shape == (2, 1, 300)
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-5)
    # and the cache it left is the same: the next step agrees
    step = np.array([[3], [4]])
    after_last = backend.forward(step, np.concatenate([mask, [[1], [1]]], axis=1), positions[:, -1:] + 1)
    backend.reset(2)
    backend.forward(ids, mask, positions)
    after_full = backend.forward(step, np.concatenate([mask, [[1], [1]]], axis=1), positions[:, -1:] + 1)
    np.testing.assert_allclose(after_last, after_full, atol=1e-5)


def as_version_2(path, out) -> None:
    """The file as craft-export wrote it before version 3: no logits_to_keep input (its initializer
    stays, a constant [0]: every position's logits, as such files computed)."""
    model = onnx.load(str(path))
    keep = next(v for v in model.graph.input if v.name == A.LOGITS_TO_KEEP)
    model.graph.input.remove(keep)
    set_version(model, "2")
    onnx.save(model, str(out))


def set_version(model: onnx.ModelProto, version: str) -> None:
    for prop in model.metadata_props:
        if prop.key == A.META_FORMAT:
            prop.value = version


@pytest.mark.parametrize("kind", KINDS)
def test_a_version_2_file_without_the_input_still_runs(files, kind, tmp_path):
    old = tmp_path / "old.onnx"
    as_version_2(files[kind], old)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    for backend in ("ort", "numpy"):
        assert (
            Generator(old, backend=backend, threads=1).generate("ĀāĂ", greedy).token_ids
            == Generator(files[kind], backend=backend, threads=1).generate("ĀāĂ", greedy).token_ids
        )
    assert Generator(old, threads=1).backend._keep is None


def rewritten(path, out, edit) -> str:
    """The file with its ModelProto edited in place; the new path."""
    model = onnx.load(str(path))
    edit(model)
    onnx.save(model, str(out))
    return out


def test_a_version_1_file_runs_too(files, tmp_path):
    old = tmp_path / "old.onnx"
    as_version_2(files["standard"], old)
    rewritten(old, tmp_path / "v1.onnx", lambda model: set_version(model, "1"))
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    assert (
        Generator(tmp_path / "v1.onnx", threads=1).generate("Ā", greedy).token_ids
        == Generator(files["standard"], threads=1).generate("Ā", greedy).token_ids
    )


def default_of(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize(
    "edit, words",
    [
        (  # a float default: ONNX Runtime would refuse the file, or bind a float where int64 goes
            lambda m: default_of(m, A.LOGITS_TO_KEEP).CopyFrom(
                onnx.numpy_helper.from_array(np.array([0.0], np.float32), A.LOGITS_TO_KEEP)
            ),
            "the default of graph input 'logits_to_keep' is float32 (1,), the format needs int64 (1,)",
        ),
        (
            lambda m: default_of(m, A.LOGITS_TO_KEEP).CopyFrom(
                onnx.numpy_helper.from_array(np.array([0, 0], np.int64), A.LOGITS_TO_KEEP)
            ),
            "is int64 (2,), the format needs int64 (1,)",
        ),
        (  # declared, but no default: a runtime that does not feed it could not run the file
            lambda m: m.graph.initializer.remove(default_of(m, A.LOGITS_TO_KEEP)),
            "'logits_to_keep' has no default value",
        ),
        (  # ONNX Runtime refuses to bind an input that has a default: craft-run would fail at its first step
            lambda m: m.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((1, 1), np.int64), A.INPUT_IDS)),
            "graph input 'input_ids' has a default value",
        ),
    ],
    ids=["float-default", "two-values", "no-default", "default-on-input_ids"],
)
def test_input_defaults_other_than_the_formats_are_refused(files, tmp_path, edit, words):
    path = rewritten(files["inplace"], tmp_path / "bad.onnx", edit)
    for backend in ("ort", "numpy"):
        with pytest.raises(ArtifactError, match=re.escape(words)) as error:
            Generator(path, backend=backend)
        assert len(str(error.value).splitlines()) == 1


def test_a_sparse_default_on_an_input_is_refused_too(files, tmp_path):
    """A sparse initializer named like an input is an input default to ONNX Runtime as well, which
    would fail to bind the input at the first step: the checker refuses sparse initializers."""
    values = onnx.numpy_helper.from_array(np.array([5], np.int64), "values")
    indices = onnx.numpy_helper.from_array(np.array([0], np.int64), "indices")

    def sparse_input_ids(model):
        model.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, [1, 1]))
        model.graph.sparse_initializer[0].values.name = A.INPUT_IDS

    path = rewritten(files["inplace"], tmp_path / "sparse.onnx", sparse_input_ids)
    for backend in ("ort", "numpy"):
        with pytest.raises(ArtifactError, match="its graph has sparse initializers") as error:
            Generator(path, backend=backend)
        assert len(str(error.value).splitlines()) == 1


def test_version_and_inputs_must_agree(files, tmp_path):
    old = tmp_path / "old.onnx"
    as_version_2(files["inplace"], old)
    lacking = onnx.load(str(old))
    set_version(lacking, "3")
    onnx.save(lacking, str(tmp_path / "lacking.onnx"))
    with pytest.raises(ArtifactError, match=r"lacks \['logits_to_keep'\]"):
        Generator(tmp_path / "lacking.onnx")
    claiming = onnx.load(str(files["inplace"]))
    set_version(claiming, "2")
    onnx.save(claiming, str(tmp_path / "claiming.onnx"))
    with pytest.raises(ArtifactError, match=r"has \['logits_to_keep'\] besides"):
        Generator(tmp_path / "claiming.onnx")
