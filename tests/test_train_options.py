"""Throughput options of the trainer: gradient accumulation, bf16 autocast, torch.compile (and its
fallback), the data loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST_TRAIN, run_cli, tiny_overrides
from craft import run_dir as rd
from craft.callbacks import read_metrics
from craft.config import load_config
from craft.data import sample_windows
from craft.train import train

FAST = {
    **FAST_TRAIN,
    "train.max_steps": 12,
    "train.eval_interval": 12,
    "train.checkpoint_interval": 12,
    "train.sample_tokens": 8,
}


def run(out: Path, corpus: Path, **extra) -> list[float]:
    train(load_config("tiny", tiny_overrides(out, corpus, **{**FAST, **extra})), log=lambda *a, **k: None)
    return [r["loss"] for r in read_metrics(out / rd.METRICS) if r["event"] == "train"]


def test_grad_accumulation_matches_the_big_batch(tmp_path, small_corpus):
    """2 micro-batches of 8 = one batch of 16: the same windows (the data RNG draws them in the
    same order), the same mean loss and update up to float rounding."""
    big = run(tmp_path / "big", small_corpus, **{"train.batch_size": 16})
    accumulated = run(tmp_path / "acc", small_corpus, **{"train.batch_size": 8, "train.grad_accum": 2})
    assert np.allclose(big, accumulated, rtol=2e-4, atol=0), list(zip(big, accumulated))
    wrong_scale = run(tmp_path / "one", small_corpus, **{"train.batch_size": 8})
    assert not np.allclose(big[1:], wrong_scale[1:], rtol=2e-4)  # the comparison can tell batches apart


def test_bfloat16_autocast_trains(tmp_path, small_corpus):
    losses = run(tmp_path / "bf16", small_corpus, **{"train.dtype": "bfloat16"})
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5


def test_compile_failure_falls_back_to_eager(tmp_path, small_corpus, monkeypatch):
    """Where torch.compile cannot work (no C++ compiler, ...) the run warns once and goes on eager,
    with the same batches: the losses equal an eager run's."""

    class Broken(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            raise RuntimeError("C++ compile error\ncc1plus: fatal error")

    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: Broken(module))
    logged = []
    cfg = load_config("tiny", tiny_overrides(tmp_path / "c", small_corpus, **{**FAST, "train.compile": True}))
    train(cfg, log=lambda *a, **k: logged.append(" ".join(map(str, a))))
    warnings = [line for line in logged if "torch.compile" in line]
    assert warnings == [
        "warning: torch.compile does not work here (RuntimeError: C++ compile error); training without it"
    ]
    compiled = [r["loss"] for r in read_metrics(tmp_path / "c" / rd.METRICS) if r["event"] == "train"]
    assert compiled == run(tmp_path / "eager", small_corpus)


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path, small_corpus):
    """torch.compile for real (about a minute on 2 cores with a cold compile cache)."""
    eager = run(tmp_path / "eager", small_corpus)
    compiled = run(tmp_path / "compiled", small_corpus, **{"train.compile": True})
    assert np.allclose(eager, compiled, rtol=1e-3), list(zip(eager, compiled))


def test_sample_windows_is_one_gather_from_the_memory_map(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    mm = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")
    batch = sample_windows(mm, 5, 16, np.random.default_rng(0))
    assert batch.shape == (5, 17) and batch.dtype == np.int64 and batch.flags.c_contiguous
    assert (np.diff(batch, axis=1) == 1).all()  # consecutive tokens: windows of the file
    assert batch.max() <= 999 and batch.min() >= 0
    assert torch.from_numpy(batch).data_ptr() == batch.ctypes.data  # handed to torch without a copy


def test_shakespeare_recipe_is_nanogpts_cpu_shape():
    cfg = load_config("shakespeare_char")
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_head, m.dim, m.context_length, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (t.batch_size, t.grad_accum, t.max_steps, t.dtype) == (12, 1, 2000, "float32")
    assert cfg.tokenizer.kind == "char" and t.compile


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["--plot", "runs/x", "--overwrite", "model.dim=8"],
            "--plot only draws a run's plot, so --overwrite, KEY=VALUE",
        ),
        (["--resume", "runs/x", "--overwrite"], "--resume continues a run and --overwrite replaces one"),
    ],
)
def test_flags_that_would_be_ignored_are_refused(args, words):
    """--plot ignored every other flag and --resume ignored --overwrite, in silence."""
    result = run_cli("craft.train", *args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
