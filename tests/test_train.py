"""craft-train: the loss falls, the run directory is complete, the schedule follows max_steps, bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import run_cli, tiny_overrides
from craft import checkpoint as ckpt
from craft import run_dir as rd
from craft.callbacks import METRIC_FIELDS, read_metrics
from craft.config import load_config
from craft.train import lr_at


def test_tiny_run_loss_falls_and_run_dir_is_complete(char_run):
    records = read_metrics(char_run / rd.METRICS)
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert train[0]["step"] == 1 and train[-1]["loss"] < train[0]["loss"] - 2.0, (train[0], train[-1])
    info = json.loads((char_run / "data.json").read_text())
    tokens = np.memmap(char_run / "tokens.bin", dtype=info["dtype"], mode="r")
    counts = np.bincount(tokens[: int(len(tokens) * 0.9)]).astype(float)
    p = counts[counts > 0] / counts.sum()
    assert evals[-1]["val_loss"] < -(p * np.log(p)).sum() - 0.3  # uses context: well below the unigram entropy
    for name in (
        rd.CONFIG,
        rd.CHAR_TOKENIZER,
        rd.CHECKPOINT,
        rd.BEST,
        rd.METRICS,
        rd.SAMPLES,
        "tokens.bin",
        "data.json",
    ):
        assert (char_run / name).is_file(), name
    assert "step 200" in (char_run / rd.SAMPLES).read_text()
    resolved = yaml.safe_load((char_run / rd.CONFIG).read_text())
    assert resolved["model"]["vocab_size"] > 0 and resolved["model"]["n_kv_head"] == 2
    state, digest = ckpt.read(char_run / rd.CHECKPOINT)
    assert state["step"] == 200 and len(digest) == 64


def test_metrics_jsonl_schema(char_run):
    records = read_metrics(char_run / rd.METRICS)
    assert {r["event"] for r in records} == {"train", "eval", "sample"}
    for r in records:
        fields = METRIC_FIELDS[r["event"]]
        assert set(r) == {"event", *fields}, r
        for key, kind in fields.items():
            assert isinstance(r[key], kind) or (kind is float and isinstance(r[key], int)), (key, r)
    steps = [r["step"] for r in records if r["event"] == "train"]
    assert steps == sorted(steps) and steps[-1] == 200


def test_short_run_needs_only_max_steps(tmp_path, small_corpus):
    """train.max_steps=30 alone works: the warmup follows it (a tenth, at most 50)."""
    result = run_cli(
        "craft.train",
        "train.max_steps=30",
        "tokenizer.kind=char",
        f"data.path={small_corpus}",
        f"out_dir={tmp_path / 'r'}",
        "model.dim=32",
        "model.n_layer=1",
        "model.n_head=2",
        "model.context_length=32",
        "train.eval_iters=1",
        "train.sample_tokens=4",
    )
    assert result.returncode == 0 and "done: step 30" in result.stdout, result.stderr
    saved = yaml.safe_load((tmp_path / "r" / rd.CONFIG).read_text())["train"]
    assert (saved["warmup_steps"], saved["lr_decay_steps"]) == (3, 30)


def test_schedule_follows_max_steps_override():
    cfg = load_config("tiny", ["train.max_steps=200", "train.warmup_steps=20", "train.lr=1e-3", "train.min_lr=1e-4"])
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 20)
    assert lr_at(19, cfg) == pytest.approx(1e-3)
    assert lr_at(110, cfg) == pytest.approx(5.5e-4)  # halfway through the decay
    assert lr_at(200, cfg) == pytest.approx(1e-4) and lr_at(199, cfg) > 1e-4
    longer = load_config(
        "tiny", ["train.max_steps=2000", "train.warmup_steps=20", "train.lr=1e-3", "train.min_lr=1e-4"]
    )
    assert lr_at(200, longer) > 9e-4  # same step, longer schedule: still near the peak
    planned = load_config(
        "tiny",
        [
            "train.max_steps=200",
            "train.lr_decay_steps=2000",
            "train.warmup_steps=20",
            "train.lr=1e-3",
            "train.min_lr=1e-4",
        ],
    )
    assert lr_at(200, planned) == lr_at(200, longer)  # lr_decay_steps, not max_steps, shapes the decay


def test_run_records_learning_rate_schedule(char_run):
    lrs = [r["lr"] for r in read_metrics(char_run / rd.METRICS) if r["event"] == "train"]
    cfg = load_config(str(char_run / rd.CONFIG))
    assert lrs[-1] == pytest.approx(cfg.train.min_lr, rel=1e-6)
    assert max(lrs) <= cfg.train.lr


def test_cli_bad_override_is_one_line_exit_2(tmp_path):
    result = run_cli("craft.train", "model.n_layers=3", f"out_dir={tmp_path / 'r'}")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "craft-train: error: unknown config key 'model.n_layers'; did you mean 'model.n_layer'?"
    )
    assert not (tmp_path / "r").exists()


def test_unreadable_corpus_leaves_no_run_directory(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 50 + b"\xff\xfe broken")
    result = run_cli("craft.train", f"data.path={bad}", f"out_dir={tmp_path / 'r'}")
    assert result.returncode == 2 and "is not UTF-8 text" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("case", ["empty_corpus", "context_longer_than_corpus", "seed", "existing_empty_dir"])
def test_refused_run_leaves_nothing_and_the_rerun_works(tmp_path, case):
    """A first run refused for its input leaves no run behind, so the corrected command runs."""
    corpus, out = tmp_path / "corpus.txt", tmp_path / "runs" / "r"
    corpus.write_text("" if case == "empty_corpus" else "to be or not to be\n" * 20)  # 400 characters
    args = [
        f"data.path={corpus}",
        f"out_dir={out}",
        "tokenizer.kind=char",
        "model.context_length=64",
        "train.threads=1",
    ]
    if case == "existing_empty_dir":
        out.mkdir(parents=True)
    refused = run_cli("craft.train", *args, "model.context_length=512", *(["train.seed=-1"] if case == "seed" else []))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    expected = {"empty_corpus": "is empty", "seed": "train.seed=-1 is out of range"}.get(
        case, "fewer than model.context_length + 2"
    )
    assert expected in refused.stderr
    assert sorted(out.iterdir()) == [] if case == "existing_empty_dir" else not (tmp_path / "runs").exists()
    if case == "empty_corpus":
        corpus.write_text("to be or not to be\n" * 20)
    small = [
        "model.dim=32",
        "model.n_layer=1",
        "model.n_head=2",
        "train.batch_size=2",
        "train.max_steps=2",
        "train.eval_iters=1",
        "train.sample_tokens=4",
    ]
    rerun = run_cli("craft.train", *args, "model.context_length=16", *small)
    assert rerun.returncode == 0 and "done: step 2" in rerun.stdout, rerun.stderr


def test_cli_missing_corpus_is_one_line_exit_2(tmp_path):
    result = run_cli("craft.train", f"data.path={tmp_path / 'nope.txt'}", f"out_dir={tmp_path / 'r'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not exist; set data.path" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_existing_run_is_not_overwritten_without_flag(char_run, tmp_path):
    before = (char_run / rd.CHECKPOINT).stat().st_mtime_ns
    result = run_cli("craft.train", f"out_dir={char_run}", "tokenizer.kind=char")
    assert result.returncode == 2 and "--resume" in result.stderr and "--overwrite" in result.stderr
    assert (char_run / rd.CHECKPOINT).stat().st_mtime_ns == before


def test_cli_trains_and_reports(tmp_path, small_corpus):
    out = tmp_path / "cli"
    result = run_cli(
        "craft.train",
        *tiny_overrides(
            out, small_corpus, **{"tokenizer.kind": "char", "train.max_steps": 20, "train.warmup_steps": 2}
        ),
    )
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "unigram entropy" in result.stdout
    assert "done: step 20 (max_steps)" in result.stdout


def test_help_explains():
    result = run_cli("craft.train", "--help")
    assert result.returncode == 0
    for word in ("--config", "--resume", "KEY=VALUE", "Exit codes"):
        assert word in result.stdout
