"""Callbacks configured in YAML: early stopping, samples, NaN stop; logging: JSONL, TensorBoard, plot."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch

import craft.model
import craft.train
from conftest import FAST_TRAIN, run_cli, tiny_overrides
from craft import checkpoint as ckpt
from craft import run_dir as rd
from craft.callbacks import EarlyStopping, MetricsLog, read_metrics
from craft.config import load_config
from craft.data import load_tokenizer
from craft.model import Transformer, generate
from craft.train import TrainError, train

FAST = FAST_TRAIN


def config(out: Path, corpus: Path, **extra):
    return load_config("tiny", tiny_overrides(out, corpus, **{**FAST, **extra}))


def quiet(*_a, **_k):
    pass


def test_early_stopping_unit():
    stop = EarlyStopping(patience=2, min_delta=0.1)
    assert [stop.update(v) for v in (3.0, 2.95, 2.9)] == [False, False, True]  # 0.05 and 0.1 are not > 0.1
    stop = EarlyStopping(patience=2, min_delta=0.1)
    assert [stop.update(v) for v in (3.0, 2.95, 2.8, 2.85, 2.69, 2.65, 2.64)] == [False] * 6 + [True]
    restored = EarlyStopping(2, 0.1)
    restored.load_state_dict(stop.state_dict())
    assert (restored.best, restored.bad_evals) == (2.69, 2)
    never = EarlyStopping(patience=0, min_delta=0.0)
    assert not any(never.update(3.0) for _ in range(10))


def test_early_stopping_stops_the_run(tmp_path, small_corpus):
    # min_delta 10: no eval can improve enough, so the run stops after 1 + patience evals
    cfg = config(
        tmp_path / "run",
        small_corpus,
        **{
            "train.max_steps": 200,
            "train.eval_interval": 10,
            "train.checkpoint_interval": 100,
            "train.early_stop_patience": 2,
            "train.early_stop_min_delta": 10.0,
        },
    )
    result = train(cfg, log=quiet)
    assert result["stopped"].startswith("early stopping") and result["step"] == 30, result
    assert result["stopped"].endswith(f"(best {result['best_val_loss']:.4f})")  # the run's best, not the stopper's
    run = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run / rd.METRICS) if r["event"] == "eval"] == [10, 20, 30]
    state, _ = ckpt.read(run / rd.CHECKPOINT)
    assert state["step"] == 30 and state["early_stopping"]["bad_evals"] == 2
    assert "--- step 30" in (run / rd.SAMPLES).read_text()  # the final sample is still written


def test_early_stopping_does_not_fire_while_improving(tmp_path, small_corpus):
    cfg = config(
        tmp_path / "run",
        small_corpus,
        **{"train.max_steps": 40, "train.eval_interval": 10, "train.early_stop_patience": 2},
    )
    assert train(cfg, log=quiet)["stopped"] == "max_steps"


class NaNAfter(Transformer):
    """Returns a NaN training loss from the `at`-th training forward call on."""

    at = 0
    calls = 0

    def forward(self, input_ids, targets=None, **kw):
        out = super().forward(input_ids, targets, **kw)
        if targets is not None and self.training:
            NaNAfter.calls += 1
            if NaNAfter.calls >= NaNAfter.at:
                return out[0], out[1] * float("nan")
        return out


def test_nan_loss_before_any_checkpoint_says_how_to_start_again(tmp_path, small_corpus, monkeypatch):
    """Rerun and --resume each refused such a run, sending the user to the other: --overwrite it is."""
    monkeypatch.setattr(craft.model, "Transformer", NaNAfter)
    monkeypatch.setattr(NaNAfter, "calls", 0)
    monkeypatch.setattr(NaNAfter, "at", 2)
    cfg = config(tmp_path / "run", small_corpus, **{"train.max_steps": 40, "train.checkpoint_interval": 5})
    with pytest.raises(TrainError, match=r"none was saved before.*start again with --overwrite"):
        train(cfg, log=quiet)
    with pytest.raises(rd.RunDirError, match="never saved one; start it again with: .* --overwrite"):
        ckpt.read_latest(tmp_path / "run")


@pytest.mark.parametrize("accum", [1, 2])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, small_corpus, monkeypatch, accum):
    monkeypatch.setattr(craft.model, "Transformer", NaNAfter)  # what craft.model.build_model builds for train.py
    monkeypatch.setattr(NaNAfter, "calls", 0)
    monkeypatch.setattr(NaNAfter, "at", 12 * accum + 1)  # the first micro-batch of step 13
    cfg = config(
        tmp_path / "run",
        small_corpus,
        **{"train.max_steps": 40, "train.checkpoint_interval": 5, "train.eval_interval": 10, "train.grad_accum": accum},
    )
    with pytest.raises(TrainError, match=r"loss became nan at step 13; .*last good checkpoint is kept.*train.lr"):
        train(cfg, log=quiet)
    run = tmp_path / "run"
    state, _ = ckpt.read(run / rd.CHECKPOINT)
    assert state["step"] == 10
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert [p.name for p in ckpt.periodic(run)] == ["step-000010.pt", "step-000005.pt"]
    assert max(r["step"] for r in read_metrics(run / rd.METRICS)) == 12  # nothing logged for the bad step


def test_diverging_run_exits_3_with_one_line(tmp_path, small_corpus):
    result = run_cli(
        "craft.train",
        *tiny_overrides(
            tmp_path / "run",
            small_corpus,
            **{
                **FAST,
                "train.lr": 1e6,
                "train.min_lr": 0,
                "train.warmup_steps": 0,
                "train.grad_clip": 0,
                "train.max_steps": 40,
                "train.checkpoint_interval": 1,
            },
        ),
    )
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("craft-train: error:") and "became nan" in lines[0], lines
    state, _ = ckpt.read(tmp_path / "run" / rd.CHECKPOINT)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_samples_every_n_steps(tmp_path, small_corpus):
    cfg = config(
        tmp_path / "run",
        small_corpus,
        **{
            "train.max_steps": 30,
            "train.eval_interval": 30,
            "train.sample_interval": 10,
            "train.sample_prompt": "ROMEO:",
            "train.sample_tokens": 24,
            "train.sample_temperature": 0.7,
            "train.sample_top_k": 1,
        },
    )
    logged = []
    train(cfg, log=lambda *a, **k: logged.append(" ".join(map(str, a))))
    run = tmp_path / "run"
    text = (run / rd.SAMPLES).read_text()
    headers = [line for line in text.splitlines() if line.startswith("--- step")]
    assert headers == [f"--- step {s} (temperature 0.7, top-k 1) ---" for s in (10, 20, 30)]
    samples = [r for r in read_metrics(run / rd.METRICS) if r["event"] == "sample"]
    assert [r["step"] for r in samples] == [10, 20, 30] and all(r["text"].startswith("ROMEO:") for r in samples)
    assert any("sample at step 10" in line for line in logged)
    # top-k 1 is greedy whatever the temperature: the final sample is the checkpoint's greedy continuation
    state, _ = ckpt.read(run / rd.CHECKPOINT)
    model = Transformer(cfg.model)
    model.load_state_dict(state["model"])
    tok = load_tokenizer(run)
    ids = generate(model, [tok.bos_id] + tok.encode("ROMEO:"), 24, temperature=0.0, eos_id=tok.eos_id)
    assert samples[-1]["text"] == "ROMEO:" + tok.decode([i for i in ids if i != tok.eos_id])


def test_metrics_resume_drops_records_past_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write({"event": "train", "step": step, "loss": 1.0})
    log.close()
    with open(tmp_path / rd.METRICS, "a") as f:
        f.write('{"event": "train", "st')  # a torn last line from a kill
    resumed = MetricsLog(tmp_path, resume_step=2)
    resumed.write({"event": "train", "step": 3, "loss": 0.5})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / rd.METRICS)] == [(1, 1.0), (2, 1.0), (3, 0.5)]
    MetricsLog(tmp_path).close()  # a new run starts a new log
    assert (tmp_path / rd.METRICS).read_text() == ""


def test_tensorboard_events_in_the_run_dir(char_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(char_run.glob(rd.TENSORBOARD_GLOB))
    assert len(events) == 1 and not [p for p in char_run.iterdir() if p.is_dir()]  # no nested folders
    acc = EventAccumulator(str(char_run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/val_loss"} <= tags
    jsonl = [(r["step"], r["loss"]) for r in read_metrics(char_run / rd.METRICS) if r["event"] == "train"]
    tb = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in tb] == [s for s, _ in jsonl] and all(
        math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(tb, jsonl)
    )


def test_plot_writes_a_png(char_run, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(char_run / rd.METRICS, run / rd.METRICS)
    result = run_cli("craft.train", "--plot", str(run))
    assert result.returncode == 0, result.stderr
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (800, 450) and len(png) > 10_000  # lines drawn, not a blank canvas


def test_plot_skips_records_whose_numbers_no_axis_can_hold(char_run, tmp_path):
    """A damaged metrics.jsonl with a step of 10^400 (OverflowError) or steps of +-1e308 (numpy's
    arange: cannot compute length) was a traceback."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    damaged = ['{"event":"train","step":1' + "0" * 400 + ',"loss":1.0,"lr":0.1}']
    damaged += ['{"event":"train","step":1e308,"loss":1.0,"lr":0.1}', '{"event":"eval","step":-1e308,"val_loss":1}']
    (run / rd.METRICS).write_text((char_run / rd.METRICS).read_text() + "\n".join(damaged) + "\n")
    result = run_cli("craft.train", "--plot", str(run))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_metrics_is_one_line_error(tmp_path):
    result = run_cli("craft.train", "--plot", str(tmp_path))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"craft-train: error: {tmp_path} has no metrics.jsonl; is it a craft-train run directory?"
    )


def test_metrics_schema_documented(char_run):
    """Every record matches callbacks.METRIC_FIELDS (the schema in its docstring); values are JSON numbers."""
    from craft.callbacks import METRIC_FIELDS

    for line in (char_run / rd.METRICS).read_text().splitlines():
        record = json.loads(line)
        fields = METRIC_FIELDS[record["event"]]
        assert set(record) == {"event", *fields}
        assert all(isinstance(record[k], t) or (t is float and isinstance(record[k], int)) for k, t in fields.items())
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))


def test_damaged_metrics_lines_are_skipped(tmp_path):
    """Bytes that are not UTF-8, a JSON list, deep nesting, a step that is not a number: read_metrics
    and --plot's filter keep only the good records (a traceback here once ended craft-train --plot)."""
    from craft.callbacks import numbers

    path = tmp_path / rd.METRICS
    good = {"event": "train", "step": 1, "loss": 2.0, "lr": 1e-3}
    path.write_bytes(
        b"\n".join(
            [
                json.dumps(good).encode(),
                b"\xff\xfe not utf-8",
                b"[1, 2]",
                b"[" * 100_000 + b"]" * 100_000,
                json.dumps({"event": "train", "step": "x", "loss": [], "lr": None}).encode(),
                b'{"event": "train", "ste',
            ]
        )
    )
    records = read_metrics(path)
    assert len(records) == 2 and records[0] == good
    assert numbers(records, "step", "loss", "lr") == [good]
