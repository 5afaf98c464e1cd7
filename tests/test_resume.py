"""Checkpoints and --resume: a killed run continues bitwise, damaged checkpoints are skipped,
signals save before exiting, old checkpoints are pruned."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FAST_TRAIN, run_cli, tiny_overrides
from craft import checkpoint as ckpt
from craft import run_dir as rd
from craft.callbacks import read_metrics

FAST = FAST_TRAIN


def overrides(out: Path, corpus: Path, **extra) -> list[str]:
    return tiny_overrides(out, corpus, **{**FAST, **extra})


def start(*args: str, hangup=signal.SIG_DFL) -> subprocess.Popen:
    """craft-train in a child; `hangup`: its SIGHUP disposition (SIG_IGN as under nohup), set whatever
    this test run inherited."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "craft.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, hangup),
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def last_step(run: Path) -> int:
    path = run / rd.METRICS
    steps = [r["step"] for r in read_metrics(path) if r.get("event") == "train"] if path.is_file() else []
    return steps[-1] if steps else 0


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while last_step(run) < step:
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no step {step} after {timeout}s"
        time.sleep(0.005)


def losses(run: Path, event: str = "train", key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run / rd.METRICS) if r["event"] == event]


def test_sigkilled_run_resumes_bitwise(tmp_path, small_corpus):
    """SIGKILL at a random step between checkpoints, --resume: the same losses, bit for bit."""
    kill_at = random.Random().randint(12, 45)  # printed on failure by the assertion messages below
    extra = {
        "train.max_steps": 60,
        "train.checkpoint_interval": 10,
        "train.eval_interval": 20,
        "train.sample_interval": 25,
    }
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = start(*overrides(whole, small_corpus, **extra))
    victim = start(*overrides(killed, small_corpus, **extra))
    wait_for_step(victim, killed, kill_at)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    stopped_at = last_step(killed)
    checkpoint_step = ckpt.read(killed / rd.CHECKPOINT)[0]["step"]
    assert 10 <= checkpoint_step <= stopped_at < 60, (
        kill_at,
        checkpoint_step,
        stopped_at,
    )  # killed mid-run, after a checkpoint

    rc, out, err = finish(start("--resume", str(killed)))
    assert rc == 0, err
    assert f"from checkpoint.pt at step {checkpoint_step}" in out
    rc, _, err = finish(reference)
    assert rc == 0, err
    expected, got = losses(whole), losses(killed)
    assert [s for s, _ in got] == list(range(1, 61)), f"kill at {kill_at}: steps {[s for s, _ in got]}"
    assert got == expected, f"kill at step {stopped_at}, resumed from {checkpoint_step}"  # exact float equality
    assert losses(killed, "eval", "val_loss") == losses(whole, "eval", "val_loss")
    assert (killed / rd.SAMPLES).read_text() == (whole / rd.SAMPLES).read_text()
    a, b = ckpt.read(whole / rd.CHECKPOINT)[0], ckpt.read(killed / rd.CHECKPOINT)[0]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory, small_corpus) -> Path:
    """A 30-step run with step-000010/20/30.pt; checkpoint.pt is step 30."""
    from conftest import train_run

    run = tmp_path_factory.mktemp("resume") / "run"
    return train_run(
        run,
        small_corpus,
        **{
            **FAST,
            "train.max_steps": 30,
            "train.checkpoint_interval": 10,
            "train.keep_last": 3,
            "train.eval_interval": 10,
        },
    )


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)  # copies: damaging them leaves the fixture alone
    (dst / rd.CHECKPOINT).unlink()
    os.link(dst / "step-000030.pt", dst / rd.CHECKPOINT)  # as the run itself links them
    return dst


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_checkpoint_falls_back_with_warning(three_checkpoints, tmp_path, damage):
    run = copy_run(three_checkpoints, tmp_path / "run")
    path = run / rd.CHECKPOINT
    size = path.stat().st_size
    if damage == "flip":
        with open(path, "r+b") as f:  # one bit in the middle of the payload
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 0x10]))
    else:
        os.truncate(path, size // 3 if damage == "truncate" else 0)
    with pytest.raises(rd.RunDirError, match="corrupted or truncated|bad header"):
        ckpt.read(path)
    assert (run / "step-000030.pt").samefile(path)  # one file under two names: both are damaged

    result = run_cli("craft.train", "--resume", str(run), "train.max_steps=40")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint.pt" in warnings[0] and "using step-000020.pt (step 20)" in warnings[0], (
        result.stdout
    )
    assert "at step 20" in result.stdout and "done: step 40" in result.stdout
    assert [s for s, _ in losses(run)] == list(range(1, 41))
    state, _ = ckpt.read(run / rd.CHECKPOINT)
    assert state["step"] == 40
    assert sorted(p.name for p in ckpt.periodic(run)) == ["step-000020.pt", "step-000030.pt", "step-000040.pt"]
    assert ckpt.read(run / "step-000030.pt")[0]["step"] == 30  # rewritten by the resumed run: whole again


def test_no_loadable_checkpoint_is_one_line_error(three_checkpoints, tmp_path):
    run = copy_run(three_checkpoints, tmp_path / "run")
    for path in ckpt.periodic(run):
        os.truncate(path, 100)
    result = run_cli("craft.train", "--resume", str(run))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("craft-train: error: no loadable checkpoint"), lines


def test_keep_last_prunes_and_checkpoint_is_the_newest(tmp_path, small_corpus):
    from conftest import train_run

    run = train_run(
        tmp_path / "run",
        small_corpus,
        **{
            **FAST,
            "train.max_steps": 50,
            "train.checkpoint_interval": 10,
            "train.keep_last": 2,
            "train.eval_interval": 25,
        },
    )
    assert [p.name for p in ckpt.periodic(run)] == ["step-000050.pt", "step-000040.pt"]
    assert (run / rd.CHECKPOINT).samefile(run / "step-000050.pt")
    best, _ = ckpt.read(run / rd.BEST)
    assert best["step"] in (25, 50) and best["best_val_loss"] == min(v for _, v in losses(run, "eval", "val_loss"))
    state, _ = ckpt.read(run / rd.CHECKPOINT)
    assert {"model", "optimizer", "scheduler", "step", "rng", "early_stopping", "best_val_loss"} <= set(state)
    assert len(state["rng"]["data"]) == 1 and state["scheduler"]["last_epoch"] == 50
    assert not list(run.glob(".*"))  # no temp files left behind


def test_longer_resumed_run_keeps_the_schedule(three_checkpoints, tmp_path):
    """--resume with a larger max_steps continues the schedule the run started with: no jump in
    lr, the extra steps train at min_lr. train.lr_decay_steps stretches the decay on purpose."""

    def lrs(run: Path) -> dict[int, float]:
        return dict(losses(run, "train", "lr"))

    cfg = yaml.safe_load((three_checkpoints / rd.CONFIG).read_text())["train"]
    assert cfg["lr_decay_steps"] == 30  # resolved when the run started
    run = copy_run(three_checkpoints, tmp_path / "longer")
    result = run_cli("craft.train", "--resume", str(run), "train.max_steps=40")
    assert result.returncode == 0, result.stderr
    before, after = lrs(three_checkpoints), lrs(run)
    assert all(after[s] == before[s] for s in range(1, 31))
    assert after[30] == pytest.approx(cfg["min_lr"]) and all(after[s] == after[30] for s in range(31, 41))

    stretched = copy_run(three_checkpoints, tmp_path / "stretched")
    result = run_cli("craft.train", "--resume", str(stretched), "train.max_steps=40", "train.lr_decay_steps=40")
    assert result.returncode == 0, result.stderr
    assert lrs(stretched)[31] > 2 * cfg["min_lr"] and lrs(stretched)[40] == pytest.approx(cfg["min_lr"])


def test_resume_of_a_finished_run_names_the_fix(three_checkpoints):
    result = run_cli("craft.train", "--resume", str(three_checkpoints))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("craft-train: error:") and "train.max_steps=" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_step_file_newer_than_checkpoint_pt_is_resumed_from(three_checkpoints, tmp_path):
    """A run killed between writing step-000030.pt and re-pointing checkpoint.pt at it (or on a
    filesystem without hard links) resumed from checkpoint.pt's step 20 without a word, then deleted
    step-000030.pt as a step past the one resumed."""
    import shutil

    run = copy_run(three_checkpoints, tmp_path / "run")
    (run / rd.CHECKPOINT).unlink()
    shutil.copyfile(run / "step-000020.pt", run / rd.CHECKPOINT)  # a file of its own, as the fallback writes it
    result = run_cli("craft.train", "--resume", str(run), "train.max_steps=31")
    assert result.returncode == 0, result.stderr
    assert "checkpoint.pt is step 20, older than step-000030.pt" in result.stdout + result.stderr
    assert "from step-000030.pt at step 30 (sha256" in result.stdout, result.stdout
    assert ckpt.read(run / rd.CHECKPOINT)[0]["step"] == 31


def test_a_run_left_with_best_pt_alone_says_how_to_resume_from_it(three_checkpoints, tmp_path):
    """'never saved one; start it again with --overwrite' - which deletes best.pt, a full checkpoint."""
    run = copy_run(three_checkpoints, tmp_path / "run")
    for path in [run / rd.CHECKPOINT, *run.glob("step-*.pt")]:
        path.unlink()
    result = run_cli("craft.train", "--resume", str(run), "train.max_steps=31")
    assert result.returncode == 2 and f"only best.pt; to resume from it: cp {run / 'best.pt'}" in result.stderr
    assert "--overwrite" not in result.stderr
    (run / rd.CHECKPOINT).write_bytes((run / "best.pt").read_bytes())
    assert run_cli("craft.train", "--resume", str(run), "train.max_steps=31").returncode == 0


def test_a_corpus_that_changed_since_the_run_began_is_named_on_resume(three_checkpoints, tmp_path, small_corpus):
    """The corpus grew between runs: its tokens were made again and training went on over other data
    (another val split too) without a word - a resume that is no longer exact."""
    run = copy_run(three_checkpoints, tmp_path / "run")
    grown = tmp_path / "grown.txt"
    grown.write_text(small_corpus.read_text() + "more text\n" * 100)
    result = run_cli("craft.train", "--resume", str(run), "train.max_steps=31", f"data.path={grown}")
    assert result.returncode == 0, result.stderr
    assert f"warning: the corpus {grown} changed since this run's tokens were made" in result.stdout
    same = copy_run(three_checkpoints, tmp_path / "same")
    result = run_cli("craft.train", "--resume", str(same), "train.max_steps=31")
    assert result.returncode == 0 and "changed since" not in result.stdout, result.stderr


def test_a_model_change_in_config_yaml_is_refused_on_resume(three_checkpoints, tmp_path):
    """model.context_length edited in config.yaml between runs: resumed with exit 0 and trained another
    model than its checkpoint's (the same change as an override is refused)."""
    run = copy_run(three_checkpoints, tmp_path / "run")
    config = yaml.safe_load((run / rd.CONFIG).read_text())
    trained = config["model"]["context_length"]
    config["model"]["context_length"] = trained // 2
    (run / rd.CONFIG).write_text(yaml.safe_dump(config))
    result = run_cli("craft.train", "--resume", str(run), "train.max_steps=40")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"model.context_length={trained // 2} where the checkpoint was trained with {trained}" in result.stderr
    assert last_step(run) == 30


def test_a_refused_overwrite_leaves_the_run_it_was_to_replace(three_checkpoints, tmp_path):
    """--overwrite deleted the old run's checkpoints first, then refused the new corpus as too short for
    the context (exit 2): the run was gone, and what was left could not be resumed."""
    run = copy_run(three_checkpoints, tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    short = tmp_path / "short.txt"
    short.write_text("hello world\n")
    result = run_cli("craft.train", *overrides(run, short), "--overwrite")
    assert result.returncode == 2 and "split has" in result.stderr, result.stderr
    assert sorted(p.name for p in run.iterdir()) == before
    resumed = run_cli("craft.train", "--resume", str(run), "train.max_steps=31")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP (terminal closed)"]
)
def test_signal_saves_a_checkpoint_and_exits_130(tmp_path, small_corpus, signum):
    run = tmp_path / "run"
    proc = start(
        *overrides(
            run,
            small_corpus,
            **{"train.max_steps": 100000, "train.checkpoint_interval": 100000, "train.eval_interval": 100000},
        )
    )
    wait_for_step(proc, run, 7)
    proc.send_signal(signum)
    rc, out, err = finish(proc)
    assert rc == 130, err
    assert "Traceback" not in err
    state, _ = ckpt.read(run / rd.CHECKPOINT)
    assert state["step"] == last_step(run) >= 7  # the step it was in when signalled, saved
    assert f"--resume {run}" in out

    result = run_cli(
        "craft.train", "--resume", str(run), f"train.max_steps={state['step'] + 3}", "train.eval_interval=50"
    )
    assert result.returncode == 0, result.stderr
    assert [s for s, _ in losses(run)] == list(range(1, state["step"] + 4))


def test_nohup_keeps_a_run_going_through_a_hangup(tmp_path, small_corpus):
    """Under nohup SIGHUP is ignored: the run must outlive the ssh session, not save and stop."""
    run = tmp_path / "run"
    forever = {"train.max_steps": 100000, "train.checkpoint_interval": 100000, "train.eval_interval": 100000}
    proc = start(*overrides(run, small_corpus, **forever), hangup=signal.SIG_IGN)
    wait_for_step(proc, run, 5)
    proc.send_signal(signal.SIGHUP)
    wait_for_step(proc, run, last_step(run) + 3)  # still training
    proc.send_signal(signal.SIGTERM)
    rc, _, err = finish(proc)
    assert rc == 130, err


def test_unit_checkpoint_hash_and_header(tmp_path):
    state = {
        "format": ckpt.FORMAT,
        "model": {"w": torch.arange(10.0)},
        "optimizer": {},
        "scheduler": {},
        "early_stopping": {},
        "step": 3,
        "best_val_loss": 1.5,
        "rng": {"data": [{}], "torch": [torch.zeros(2, dtype=torch.uint8)]},
    }
    path = tmp_path / "c.pt"
    digest = ckpt.write(state, path)
    loaded, again = ckpt.read(path)
    assert again == digest and torch.equal(loaded["model"]["w"], state["model"]["w"])
    blob = path.read_bytes()
    path.write_bytes(blob + b"x")  # appended garbage is a mismatch too
    with pytest.raises(rd.RunDirError, match="SHA-256"):
        ckpt.read(path)
    path.write_bytes(b"PK\x03\x04" + blob[4:])  # a bare torch.save zip, not ours
    with pytest.raises(rd.RunDirError, match="bad header"):
        ckpt.read(path)
    (tmp_path / rd.CHECKPOINT).mkdir()  # checkpoint.pt a directory: one error, and no hard link left behind
    with pytest.raises(OSError):
        ckpt.write_periodic(state, tmp_path, 3, keep_last=2)
    assert not (tmp_path / f".{rd.CHECKPOINT}.link").exists()


def test_unit_truncate_samples(tmp_path):
    text = "".join(
        f"--- step {s} (temperature 0.8, top-k 40) ---\nline {s}\n--- not a header\n\n" for s in (10, 20, 30)
    )
    (tmp_path / rd.SAMPLES).write_text(text)
    rd.truncate_samples(tmp_path, 25)
    kept = (tmp_path / rd.SAMPLES).read_text()
    assert "line 20" in kept and "step 30" not in kept and kept == text[: text.index("--- step 30")]
    rd.truncate_samples(tmp_path, 0)
    assert not (tmp_path / rd.SAMPLES).exists()


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: p.pop("rng"), "'rng' is not the random-number states"),
        (lambda p: p.update(step="x"), "'step' is 'x', not a count"),
        (lambda p: p.update(best_val_loss="low"), "'best_val_loss' or 'elapsed_s' is not a number"),
        (lambda p: p.update(model=3), "'model' is not a mapping of names to dense tensors"),
        (lambda p: p.update(optimizer=[1]), "'optimizer' is not a mapping"),
        (lambda p: p["early_stopping"].update(best="x"), "not a loss and a count"),
        (lambda p: p["rng"]["data"][0].update(bit_generator="MT19937"), "state must be for a PCG64 RNG"),
        (lambda p: p["model"].update({"tok_embeddings.weight": torch.zeros(3)}), "size mismatch"),
    ],
)
def test_well_formed_checkpoint_with_wrong_contents_is_one_line(three_checkpoints, tmp_path, damage, words):
    """The SHA-256 in the header is no signature: a file with a valid hash can hold anything. Its
    contents are checked (types at read, the rest where they are loaded): one line, exit 2."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    for path in ckpt.periodic(run) + [run / rd.CHECKPOINT]:
        payload, _ = ckpt.read(path)
        damage(payload)
        ckpt.write(payload, path)
    result = run_cli("craft.train", "--resume", str(run), "train.max_steps=40")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("craft-train: error:") and words in result.stderr, result.stderr


@pytest.mark.parametrize("interrupted_eval", [2, 3], ids=["mid-run", "last step"])
def test_signal_during_an_eval_is_made_up_on_resume(tmp_path, small_corpus, monkeypatch, interrupted_eval):
    """A signal abandons an eval; the resumed run did not redo it (no eval record, a different best.pt
    or early stop), and at the last step it refused to resume at all ('already reached step N') - the
    final eval and sample were lost for good. Now the checkpoint says the step is undone."""
    from craft import train as T
    from craft.config import load_config, resumed_config

    extra = {"train.max_steps": 30, "train.eval_interval": 10, "train.checkpoint_interval": 10}
    extra["train.sample_interval"] = 10
    quiet = dict(log=lambda *a, **k: None)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    T.train(load_config(None, overrides(whole, small_corpus, **extra)), **quiet)

    real, calls = T.evaluate, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == interrupted_eval:
            signal.raise_signal(signal.SIGINT)  # Signals() takes it; the eval sees it between batches
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "evaluate", signalled)
    stopped = T.train(load_config(None, overrides(cut, small_corpus, **extra)), **quiet)
    assert stopped["stopped"] == "signal SIGINT" and stopped["step"] == 10 * interrupted_eval
    monkeypatch.undo()
    T.train(resumed_config(cut, []), resume=True, **quiet)
    assert losses(cut, "eval", "val_loss") == losses(whole, "eval", "val_loss") != []
    assert (cut / rd.SAMPLES).read_text() == (whole / rd.SAMPLES).read_text()
    for name in (rd.CHECKPOINT, rd.BEST):
        a, b = ckpt.read(whole / name)[0], ckpt.read(cut / name)[0]
        assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
