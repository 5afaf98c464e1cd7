"""Data-parallel training: torchrun with 2 processes on this machine (gloo), rank 0 writes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import run_cli, tiny_overrides, torchrun
from craft import checkpoint as ckpt
from craft import run_dir as rd
from craft.callbacks import read_metrics
from craft.config import load_config
from craft.model import Transformer


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, small_corpus) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun(
        *tiny_overrides(
            run,
            small_corpus,
            **{
                "tokenizer.kind": "char",
                "train.batch_size": 8,
                "train.max_steps": 40,
                "train.warmup_steps": 5,
                "train.eval_interval": 20,
                "train.eval_iters": 4,
                "train.log_interval": 5,
                "train.checkpoint_interval": 20,
                "train.threads": 0,
            },
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


def test_two_processes_train_and_rank_0_writes(ddp_run):
    run, result = ddp_run
    assert "distributed: 2 processes (gloo)" in result.stdout
    assert result.stdout.count("done: step 40") == 1  # rank 0 reports, rank 1 stays quiet
    train = [r for r in read_metrics(run / rd.METRICS) if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 5, 10, 15, 20, 25, 30, 35, 40]  # written once, not once per rank
    assert train[-1]["loss"] < train[0]["loss"] - 1.5, (train[0], train[-1])
    assert (run / rd.SAMPLES).read_text().count("--- step") == 1
    assert len(list(run.glob(rd.TENSORBOARD_GLOB))) <= 1

    state, _ = ckpt.read(run / rd.CHECKPOINT)
    assert state["step"] == 40 and len(state["rng"]["data"]) == 2 and len(state["rng"]["torch"]) == 2
    assert state["rng"]["data"][0] != state["rng"]["data"][1]  # each rank reads its own windows
    cfg = load_config(str(run / rd.CONFIG))
    model = Transformer(cfg.model)
    model.load_state_dict(state["model"])  # plain keys: no "module." prefix from DDP
    assert torch.isfinite(model(torch.arange(10).unsqueeze(0))).all()


def test_two_process_run_resumes_on_two(ddp_run, tmp_path):
    run = shutil.copytree(ddp_run[0], tmp_path / "run")
    result = torchrun("--resume", str(run), "train.max_steps=50")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from checkpoint.pt at step 40" in result.stdout and "done: step 50" in result.stdout
    assert "warning" not in result.stdout
    assert ckpt.read(run / rd.CHECKPOINT)[0]["step"] == 50


def test_two_process_run_resumes_on_one_with_a_warning(ddp_run, tmp_path):
    run = shutil.copytree(ddp_run[0], tmp_path / "run")
    result = run_cli("craft.train", "--resume", str(run), "train.max_steps=45")
    assert result.returncode == 0, result.stderr
    assert "written by 2 processes, this run has 1" in result.stdout and "done: step 45" in result.stdout
    assert len(ckpt.read(run / rd.CHECKPOINT)[0]["rng"]["data"]) == 1


def test_a_late_rank_does_not_take_rank_0s_tokenizer_for_an_old_run(tmp_path, small_corpus, monkeypatch):
    """Ranks start at different times: rank 1 may first look at out_dir after rank 0 has written the
    new run's tokenizer there. Only rank 0 decides whether out_dir already held a run (rank 1 once
    refused it as one, exit 2, and took the whole torchrun down)."""
    from craft.distributed import Distributed
    from craft.train import prepare_run

    cfg = load_config("tiny", tiny_overrides(tmp_path / "run", small_corpus, **{"tokenizer.kind": "char"}))
    rank0_tokenizer, _ = prepare_run(cfg, resume=False, overwrite=False, dist=Distributed(), log=lambda *a: None)
    monkeypatch.setenv("RANK", "1")  # WORLD_SIZE stays 1: no process group, barrier() returns at once
    tokenizer, data = prepare_run(cfg, resume=False, overwrite=False, dist=Distributed(), log=lambda *a: None)
    assert tokenizer.vocab_size == rank0_tokenizer.vocab_size and len(data.train) > 0
