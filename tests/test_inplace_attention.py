"""The `inplace` attention variant (GroupQueryAttention, one cache buffer bound as past and present)
computes what the `standard` graph computes: same greedy tokens on both ort paths and the numpy
backend, for single prompts, left-padded batches, a prompt fed in chunks (a chat turn after a
cached one) and generation up to the context length; export verifies it against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

from craft.runtime import artifact as A
from craft.runtime.artifact import ArtifactError
from craft.runtime.generator import Generator
from craft.runtime.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=24, temperature=0)
PROMPTS = ["Ā", "ĀāĂăĄ", "ĂăĄąĆćĈĉĊ", ""]


@pytest.fixture(
    scope="module", params=[("int8", False), ("none", False), ("int8", True)], ids=["int8", "fp32", "int8-qkv-bias"]
)
def pair(request, tmp_path_factory) -> dict:
    """{"standard": Generator, "inplace": Generator, "numpy": Generator on the inplace file}: one
    random model with grouped-query heads (4 query, 2 key-value), both attention variants; with
    q/k/v biases (imported Qwen2 models) in one case: the bias is added before the rotary."""
    import torch

    from craft.config import ModelConfig
    from craft.export.exporter import build_model_proto, random_run

    quantize, qkv_bias = request.param
    run = random_run(
        ModelConfig(
            vocab_size=512, dim=64, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=128, context_length=48, qkv_bias=qkv_bias
        )
    )
    if qkv_bias:  # large enough to change the tokens if the bias went in after the rotary
        with torch.no_grad():
            for name, p in run.model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("inplace")
    gens = {}
    for attention in A.ATTENTIONS:
        path = folder / f"{attention}.onnx"
        path.write_bytes(build_model_proto(run, quantize, attention=attention)[0].SerializeToString())
        gens[attention] = Generator(path, threads=1)
    gens["numpy"] = Generator(folder / "inplace.onnx", backend="numpy")
    return gens


def logits_tolerance(pair: dict, logits: np.ndarray) -> float:
    """How far two paths' logits may differ: 1e-4 in float32. An int8 file rounds its activations
    per block, and where the two paths sum a value in another order one rounding can flip and move
    a logit by up to ~3e-3 (measured on random ids: 1-4% of draws exceed 1e-4, on any CPU)."""
    if pair["inplace"].artifact.quantization == "none":
        return 1e-4
    return 5e-3 * float(np.abs(logits).max())


def test_inplace_file_declares_itself_and_its_cache_shape(pair):
    assert pair["inplace"].artifact.attention == A.ATTENTION_INPLACE and pair["inplace"].backend.inplace
    assert pair["standard"].artifact.attention == A.ATTENTION_STANDARD and not pair["standard"].backend.inplace
    pair["inplace"].generate("Ā", GREEDY)
    assert pair["inplace"].backend._buffers[0].shape == (1, 2, 48, 16)  # (B, kv, context, hd), written in place


def test_inplace_greedy_equals_standard_and_numpy(pair):
    for prompt in PROMPTS:
        expected = pair["standard"].generate(prompt, GREEDY).token_ids
        assert pair["inplace"].generate(prompt, GREEDY).token_ids == expected, prompt
        assert pair["numpy"].generate(prompt, GREEDY).token_ids == expected, prompt


def test_inplace_left_padded_batch_equals_one_by_one(pair):
    batch = pair["inplace"].generate_batch(PROMPTS, GREEDY)
    assert [c.token_ids for c in batch] == [pair["standard"].generate(p, GREEDY).token_ids for p in PROMPTS]


def test_inplace_to_the_end_of_the_context(pair):
    long = SamplingParams(max_new_tokens=100, temperature=0)
    a, b = pair["standard"].generate("Ā", long), pair["inplace"].generate("Ā", long)
    assert b.token_ids == a.token_ids and b.stats.stop_reason == a.stats.stop_reason == "context_length"


def test_inplace_chunked_prefill_equals_standard(pair):
    """A chat turn: a prompt prefilled after cached tokens (past > 0, several new tokens)."""
    ids = np.arange(3, 12)[None]
    logits = {}
    for name in A.ATTENTIONS:
        backend = pair[name].backend
        backend.reset(1)
        steps = [
            backend.forward(ids[:, :4], np.ones((1, 4), np.int64), np.arange(4)[None]),
            backend.forward(ids[:, 4:], np.ones((1, 9), np.int64), np.arange(4, 9)[None]),
            backend.forward(np.array([[20]]), np.ones((1, 10), np.int64), np.array([[9]])),
        ]
        logits[name] = np.concatenate(steps, axis=1)
    assert np.abs(logits["standard"] - logits["inplace"]).max() < logits_tolerance(pair, logits["standard"])


def test_decode_steps_through_bound_buffers_equal_the_general_path(pair):
    """A batch's one-token steps go through buffers bound once (ort_backend._decode_step); each
    step's logits equal those of a prefill of the same tokens and stay what they were when the
    next step overwrites the buffer."""
    backend = pair["inplace"].backend
    ids = np.array([[3, 9, 14, 2, 7, 30], [5, 5, 40, 1, 8, 11]])
    backend.reset(2)
    whole = backend.forward(ids, np.ones_like(ids), np.broadcast_to(np.arange(6), ids.shape))
    backend.reset(2)
    backend.forward(ids[:, :2], np.ones((2, 2), np.int64), np.broadcast_to(np.arange(2), (2, 2)))
    steps = [
        backend.forward(ids[:, t : t + 1], np.ones((2, t + 1), np.int64), np.full((2, 1), t), last_only=True)
        for t in range(2, 6)
    ]
    assert backend._step_bound  # the fast path ran
    np.testing.assert_allclose(np.concatenate(steps, axis=1), whole[:, 2:], atol=logits_tolerance(pair, whole))
    # then a batch of another size, and a multi-token step after decode steps (a chat turn's prefill)
    row = ids[:1]
    backend.reset(1)
    backend.forward(row[:, :2], np.ones((1, 2), np.int64), np.arange(2)[None])
    step = backend.forward(row[:, 2:3], np.ones((1, 3), np.int64), np.array([[2]]), last_only=True)
    assert backend._step_bound
    rest = backend.forward(row[:, 3:], np.ones((1, 6), np.int64), np.arange(3, 6)[None])
    assert not backend._step_bound
    np.testing.assert_allclose(
        np.concatenate([step, rest], axis=1)[0], whole[0, 2:], atol=logits_tolerance(pair, whole)
    )


def test_unknown_attention_in_metadata_is_one_line_error(pair):
    meta = pair["inplace"].artifact.to_metadata()
    assert meta[A.META_ATTENTION] == A.ATTENTION_INPLACE
    assert A.META_ATTENTION not in pair["standard"].artifact.to_metadata()  # standard files read as before
    with pytest.raises(ArtifactError, match="craft.attention"):
        A.Artifact.from_metadata({**meta, A.META_ATTENTION: "paged"})


def test_craft_export_attention_flag_verifies_inplace_against_pytorch(char_run, tmp_path):
    """craft-export --attention inplace: verified like any export (PyTorch parity, int8 perplexity)."""
    import json

    import onnx

    from conftest import run_cli

    result = run_cli("craft.export.cli", str(char_run), "-o", str(tmp_path / "m.onnx"), "--attention", "inplace")
    assert result.returncode == 0, result.stderr
    meta = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    report = json.loads(meta[A.META_EXPORT_REPORT])
    assert meta[A.META_ATTENTION] == report["attention"] == A.ATTENTION_INPLACE
    assert max(report["prefill_max_abs_diff"], report["decode_max_abs_diff"]) < 1e-4
    bad = run_cli("craft.export.cli", str(char_run), "-o", str(tmp_path / "n.onnx"), "--attention", "paged")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "n.onnx").exists()
    gen = Generator(tmp_path / "m.onnx", threads=1)
    assert (
        gen.generate("ROMEO:", GREEDY).token_ids
        == Generator(tmp_path / "m.onnx", backend="numpy").generate("ROMEO:", GREEDY).token_ids
    )


def test_an_unknown_attention_op_is_blamed_on_the_runtime_only_when_it_is_too_old(pair, tmp_path, monkeypatch):
    """ONNX Runtime refusing a GroupQueryAttention node: an old onnxruntime (the line says which to
    install), or on a current one a damaged file (the line says re-export). A renamed op is caught
    before ONNX Runtime sees it (the graph then has no GroupQueryAttention): a damaged attribute."""
    import onnx
    import onnxruntime

    model = onnx.load(str(pair["inplace"].path))
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            next(a for a in node.attribute if a.name == "kv_num_heads").i = 0
    path = tmp_path / "unknown_op.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load it .*re-export it"):
        Generator(path, threads=1)
    monkeypatch.setattr(onnxruntime, "__version__", "1.17.3")
    with pytest.raises(ArtifactError, match=f"cannot run; install onnxruntime>={A.ORT_INPLACE_MIN}"):
        Generator(path, threads=1)


def test_inplace_file_refused_by_an_onnxruntime_too_old_for_it(pair, monkeypatch):
    """onnxruntime 1.18 / 1.19 run GroupQueryAttention but miscompute a prefill after cached tokens
    (a chat turn; measured: logits off by 0.3): the runtime refuses with one line instead."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.19.2")
    with pytest.raises(ArtifactError, match=f"onnxruntime>={A.ORT_INPLACE_MIN}"):
        Generator(pair["inplace"].path, threads=1)
    Generator(pair["standard"].path, threads=1)  # standard files run anywhere
