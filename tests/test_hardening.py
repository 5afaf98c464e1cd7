"""craft-train under hostile conditions: OS errors are one line (exit 1 or 2) and leave no temp
files, a run directory has one writer at a time, a resume trains only on the run's own data,
SIGTERM is honoured during a long eval, and tokenizing a large corpus takes bounded memory."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import FAST_TRAIN, REPO, run_cli, tiny_overrides, train_run
from craft import checkpoint as ckpt
from craft import run_dir as rd
from craft.callbacks import read_metrics
from craft.data import DATA_INFO, TOKENS

FAST = {**FAST_TRAIN, "train.warmup_steps": 2}


def overrides(out: Path, corpus: Path, **extra) -> list[str]:
    return tiny_overrides(out, corpus, **{**FAST, **extra})


def assert_one_line(result: subprocess.CompletedProcess, prog: str, code: int, *needles: str) -> str:
    """The command failed with `code` and exactly one stderr line 'PROG: error: ...' holding `needles`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and lines[0].startswith(f"{prog}: error:"), (
        result.returncode,
        result.stderr[-3000:],
    )
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def temp_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.name.endswith(".tmp"))


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "craft.train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def last_step(run: Path) -> int:
    path = run / rd.METRICS
    steps = [r["step"] for r in read_metrics(path) if r.get("event") == "train"] if path.is_file() else []
    return steps[-1] if steps else 0


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while last_step(run) < step:
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no step {step} after {timeout}s"
        time.sleep(0.01)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, read_only) -> a fresh tmpfs under tmp_path (root only; unmounted afterwards)."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a small tmpfs")
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        if (
            subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True).returncode
            != 0
        ):
            pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN)")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def short_run(tmp_path, small_corpus) -> Path:
    """A 10-step char run of its own (tests damage it)."""
    return train_run(
        tmp_path / "run",
        small_corpus,
        **{**FAST, "train.max_steps": 10, "train.checkpoint_interval": 10, "train.eval_interval": 10},
    )


# --- OS errors: one line, nothing left behind ----------------------------------------------------


def test_out_dir_that_is_a_file_is_refused(tmp_path, small_corpus):
    out = tmp_path / "taken"
    out.write_text("not a directory")
    assert_one_line(run_cli("craft.train", *overrides(out, small_corpus)), "craft-train", 2, "is a file")
    assert_one_line(run_cli("craft.train", *overrides(out / "run", small_corpus)), "craft-train", 2, "which is a file")
    assert out.read_text() == "not a directory"


def test_out_dir_that_cannot_be_written_is_refused(tmp_path, small_corpus, tmpfs):
    """An OS condition: exit 1 as in craft-export (it was 2, bad input, with 'choose another
    out_dir' even for --resume of a run on a read-only mount)."""
    read_only = tmpfs("1m", read_only=True)
    assert_one_line(
        run_cli("craft.train", *overrides(read_only / "run", small_corpus)),
        "craft-train",
        1,
        "cannot be written (permission denied or a read-only filesystem); check its permissions",
    )


@pytest.mark.parametrize("case", ["binary", "unreadable", "directory"])
def test_config_that_cannot_be_read_is_one_line(tmp_path, case):
    config = tmp_path / "mine.yaml"
    if case == "binary":
        config.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 50)
    elif case == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file: no unreadable config")
        config.write_text("model:\n  dim: 64\n")
        config.chmod(0)
    else:
        config.mkdir()
    expected = {
        "binary": "not a UTF-8 text file",
        "unreadable": "cannot read config",
        "directory": "is not a regular file",
    }[case]
    assert_one_line(run_cli("craft.train", "--config", str(config)), "craft-train", 2, expected)


def test_disk_full_while_tokenizing_leaves_nothing(tmp_path, small_corpus, tmpfs):
    """tokens.bin (400 kB) does not fit a 256 kB tmpfs: one line naming it, exit 1, no tokens.tmp."""
    disk = tmpfs("256k")
    result = run_cli("craft.train", *overrides(disk / "run", small_corpus))
    assert_one_line(result, "craft-train", 1, TOKENS, "No space left on device", "free some space")
    assert list(disk.iterdir()) == []  # the refused first run removed its directory, temp files included


def test_disk_full_at_a_checkpoint_keeps_the_last_one(tmp_path, small_corpus, monkeypatch, capsys):
    """ENOSPC while writing step 20's checkpoint (simulated at fsync, in-process): exit 1 with one
    line naming the file; checkpoint.pt still holds step 10 and no temp file is left."""
    from craft.train import main

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if "step-000020.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        main(
            overrides(
                run,
                small_corpus,
                **{"train.max_steps": 30, "train.checkpoint_interval": 10, "train.eval_interval": 100},
            )
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("craft-train: error:") and "step-000020.pt: No space left on device" in err[0]
    assert ckpt.read(run / rd.CHECKPOINT)[0]["step"] == 10
    assert temp_files(run) == []


def test_out_of_inodes_for_tensorboard_is_one_line(tmp_path, small_corpus, tmpfs):
    """TensorBoard's writer thread printed its own "Exception in thread" traceback besides the one
    line, which named the path as b'...'."""
    pytest.importorskip("tensorboard")
    out = tmpfs("10m,nr_inodes=8") / "run"
    result = run_cli("craft.train", *overrides(out, small_corpus))
    line = assert_one_line(result, "craft-train", 1, "No space left on device")
    assert "b'" not in line and "events.out.tfevents" in line


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
@pytest.mark.parametrize("fault", ["closed", "full", "reader gone"])
def test_output_that_fails_costs_no_run(tmp_path, small_corpus, stream, fault):
    """The log lines go to stdout, the progress bar and eval lines to stderr. Closed (2>&-), full
    (>/dev/full) or with the reader gone (craft-train | head -1), tqdm or click.echo raised and
    the run died with exit 1 mid-training, no checkpoint (and for a pipe, no message). They are
    optional: the run finishes."""
    if fault == "full" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    fd = 1 if stream == "stdout" else 2
    target, reader = None, None
    if fault == "full":
        target = open("/dev/full", "w")
    elif fault == "reader gone":
        reader, target = os.pipe()
        os.close(reader)  # every write to the pipe now fails with EPIPE
    kw = {"preexec_fn": lambda: os.close(fd)} if fault == "closed" else {stream: target}
    other = "stderr" if stream == "stdout" else "stdout"
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "craft.train",
                *overrides(tmp_path / "run", small_corpus, **{"train.max_steps": 20}),
            ],
            **{other: subprocess.PIPE},
            text=True,
            timeout=300,
            **kw,
        )
    finally:
        if hasattr(target, "close"):
            target.close()
        elif target is not None:
            os.close(target)
    shown = result.stderr if stream == "stdout" else result.stdout
    assert result.returncode == 0, shown
    assert ckpt.read(tmp_path / "run" / rd.CHECKPOINT)[0]["step"] == 20
    if stream == "stderr":
        assert "done: step" in result.stdout, result.stdout
    else:
        assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr


# --- the run directory: one writer, the run's own data -------------------------------------------


def test_unit_run_lock_names_its_holder(tmp_path):
    first, second = rd.RunLock(tmp_path), rd.RunLock(tmp_path)
    first.acquire()
    with pytest.raises(rd.RunDirError, match=f"in use by another craft-train \\(pid {os.getpid()}\\)"):
        second.acquire()
    first.release()
    second.acquire()  # released: the next writer gets it
    second.release()


def test_two_resumes_at_once_the_second_is_refused(short_run):
    first = start(
        "--resume",
        str(short_run),
        "train.max_steps=100000",
        "train.eval_interval=100000",
        "train.checkpoint_interval=100000",
    )
    try:
        wait_for_step(first, short_run, 12)
        second = run_cli("craft.train", "--resume", str(short_run), "train.max_steps=20")
        assert_one_line(
            second, "craft-train", 2, f"in use by another craft-train (pid {first.pid})", f"kill {first.pid}"
        )
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    step = ckpt.read(short_run / rd.CHECKPOINT)[0]["step"]
    again = run_cli("craft.train", "--resume", str(short_run), f"train.max_steps={step + 2}")
    assert again.returncode == 0, again.stderr  # the lock went with its holder
    assert [r["step"] for r in read_metrics(short_run / rd.METRICS) if r["event"] == "train"] == list(
        range(1, step + 3)
    )


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_token_file_is_rebuilt_on_resume(short_run, damage):
    """tokens.bin cut short or with one byte changed: the resume re-tokenizes the corpus rather than
    training on other data, and the file comes back identical."""
    tokens = short_run / TOKENS
    original = hashlib.sha256(tokens.read_bytes()).hexdigest()
    assert json.loads((short_run / DATA_INFO).read_text())["tokens_sha256"] == original
    data = bytearray(tokens.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    tokens.write_bytes(bytes(data))
    result = run_cli("craft.train", "--resume", str(short_run), "train.max_steps=12")
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(tokens.read_bytes()).hexdigest() == original


@pytest.mark.parametrize("damage", ["tokenizer_swapped", "tokenizer_garbage", "data_json_garbage", "config_binary"])
def test_resume_refuses_what_the_run_did_not_make(short_run, damage):
    from craft.runtime.tokenizer import CharTokenizer

    expected = {
        "tokenizer_swapped": "is not the tokenizer this run was trained with",
        "tokenizer_garbage": "is not a valid tokenizer",
        "data_json_garbage": "is damaged",
        "config_binary": "not a UTF-8 text file",
    }[damage]
    if damage == "tokenizer_swapped":  # another corpus's char tokenizer: the ids would mean other characters
        (short_run / rd.CHAR_TOKENIZER).write_bytes(CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz \n"]).to_bytes())
    elif damage == "tokenizer_garbage":
        (short_run / rd.CHAR_TOKENIZER).write_bytes(b"\x00{not json")
    elif damage == "data_json_garbage":
        (short_run / DATA_INFO).write_text('{"n_tokens": 12')
    else:
        (short_run / rd.CONFIG).write_bytes(b"\xff\xfe\x00binary")
    before = ckpt.read(short_run / rd.CHECKPOINT)[1]
    assert_one_line(
        run_cli("craft.train", "--resume", str(short_run), "train.max_steps=12"), "craft-train", 2, expected
    )
    assert ckpt.read(short_run / rd.CHECKPOINT)[1] == before  # nothing trained


def test_refused_pickle_never_suggests_weights_only_false(tmp_path):
    """A checkpoint whose (correctly hashed) payload pickles an arbitrary object."""
    import io
    import pickle

    buf = io.BytesIO()
    pickle.dump({"format": ckpt.FORMAT, "evil": Path("/etc")}, buf)
    data = buf.getvalue()
    path = tmp_path / "evil.pt"
    path.write_bytes(ckpt.MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)
    with pytest.raises(rd.RunDirError) as refused:
        ckpt.read(path)
    message = str(refused.value)
    assert "data only" in message and "weights_only" not in message and "\n" not in message


def test_a_checkpoint_is_judged_by_its_header_before_it_is_read_whole(tmp_path, short_run):
    """A 1 GB file that is no checkpoint was read whole before the 11-byte header said so; a correctly
    hashed payload whose zip records are compressed (torch.save never does) inflated at load."""
    import io
    import tracemalloc
    import zipfile

    big = tmp_path / "big.pt"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: no disk used
    tracemalloc.start()
    with pytest.raises(rd.RunDirError, match="bad header"):
        ckpt.read(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, peak

    blob = (short_run / rd.CHECKPOINT).read_bytes()
    payload = blob[len(ckpt.MAGIC) + 65 :]
    packed = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(payload)) as old, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info))
    data = packed.getvalue()
    path = tmp_path / "packed.pt"
    path.write_bytes(ckpt.MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)
    with pytest.raises(rd.RunDirError, match="is compressed, which torch.save never does"):
        ckpt.read(path)


# --- signals and temp files -------------------------------------------------------------------------


def test_sigterm_during_a_long_eval_exits_promptly_with_a_checkpoint(tmp_path, small_corpus):
    run = tmp_path / "run"
    proc = start(
        *overrides(
            run,
            small_corpus,
            **{
                "train.max_steps": 1000,
                "train.eval_interval": 5,
                "train.eval_iters": 1_000_000,
                "train.checkpoint_interval": 1000,
            },
        )
    )
    wait_for_step(proc, run, 5)
    time.sleep(1.0)  # well inside the eval (a million batches)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - signalled
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert took < 15, f"exited {took:.1f}s after SIGTERM"  # a batch and a checkpoint, not the whole eval
    assert ckpt.read(run / rd.CHECKPOINT)[0]["step"] == 5
    assert not [r for r in read_metrics(run / rd.METRICS) if r["event"] == "eval"]  # the abandoned eval logged nothing


@pytest.mark.parametrize("signum, code, said", [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up")])
def test_sigterm_during_an_atomic_write_removes_its_temp(tmp_path, signum, code, said):
    """What craft-export's final write (and every run-directory write) relies on: a command run by
    OneLineErrors turns SIGTERM into an exception, and atomic_file removes its temp file on it.
    SIGHUP (a closed terminal, a dropped ssh session) killed it and left the temp file."""
    target = tmp_path / "model.onnx"
    script = textwrap.dedent(f"""
        import sys, time, click
        from craft.run_dir import atomic_file
        from craft.runtime.command import OneLineErrors

        @click.command(cls=OneLineErrors)
        def main():
            with atomic_file({str(target)!r}) as f:
                f.write(b"x" * 1000)
                print("writing", flush=True)
                time.sleep(60)
        main()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),  # as a terminal's shell starts it (not nohup)
    )
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    assert len(temp_files(tmp_path)) == 1 and f".{os.path.basename(target)}.{proc.pid}." in temp_files(tmp_path)[0].name
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code and err.strip() == f"main: {said}", err
    assert list(tmp_path.iterdir()) == []


def test_unit_sweep_removes_only_temp_files_of_dead_writers(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        stale, live, other = (
            tmp_path / f".model.onnx.{gone.pid}.abc.tmp",
            tmp_path / f".model.onnx.{alive.pid}.abc.tmp",
            tmp_path / f".other.onnx.{gone.pid}.abc.tmp",
        )
        users = [  # deleted by every export once (a name that merely began with .model.onnx)
            tmp_path / ".model.onnx.bak.tmp",
            tmp_path / ".model.onnx_draft.tmp",
            tmp_path / f".model.onnx-notes.{gone.pid}.abc.tmp",
            tmp_path / ".model.onnx.k3j_x.tmp",
        ]
        for path in (stale, live, other, *users):
            path.write_bytes(b"partial")
        rd.sweep_temp_files(tmp_path, "model.onnx")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, *(p.name for p in users)])
    finally:
        alive.kill()
        alive.wait()


# --- memory -------------------------------------------------------------------------------------------


def test_tokenizing_a_large_corpus_takes_bounded_memory(tmp_path, shakespeare):
    """50 MB of text with the char tokenizer: the tokenizing process's peak RSS grows by less than
    half the corpus - by what one 1M-char chunk takes (~20 MB); before chunking it grew by ~10x
    the corpus (a Python list of every id of a document)."""
    text = shakespeare.read_text(encoding="utf-8")
    corpus = tmp_path / "big.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        while f.tell() < 50_000_000:
            f.write(text)
    size = corpus.stat().st_size
    script = textwrap.dedent(f"""
        from pathlib import Path
        from craft.config import load_config
        from craft.data import Corpus, prepare_tokens, train_tokenizer

        def status(key):
            return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

        cfg = load_config("tiny", ["data.path={corpus}", "tokenizer.kind=char", "out_dir={tmp_path / "run"}"])
        corpus = Corpus(cfg.data.path)
        tokenizer = train_tokenizer(cfg, corpus)
        Path(cfg.out_dir).mkdir()
        base = status("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
        data = prepare_tokens(cfg, corpus, tokenizer, Path(cfg.out_dir))
        print(base, status("VmHWM:"), data.info["n_tokens"])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    base, peak, n_tokens = map(int, result.stdout.split())
    assert n_tokens == len(corpus.read_text(encoding="utf-8")) + 2  # BOS + one id per (known) char + EOS
    assert peak - base < size / 2, f"peak RSS grew by {(peak - base) / 1e6:.0f} MB tokenizing {size / 1e6:.0f} MB"
    shutil.rmtree(tmp_path / "run")


# --- a run directory from someone else: its symlinks are not followed ------------------------------


def test_a_symlinked_lock_is_refused_and_its_target_kept(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("precious\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / rd.LOCK).symlink_to(target)
    with pytest.raises(rd.RunDirError, match="is a symlink"):
        rd.RunLock(tmp_path / "run").acquire()
    assert target.read_text() == "precious\n"


def test_appends_and_the_plot_do_not_write_through_symlinks(tmp_path):
    target = tmp_path / "bashrc"
    target.write_text("export PATH=/usr/bin\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / rd.SAMPLES).symlink_to(target)
    with pytest.raises(rd.RunDirError, match="samples.txt is a symlink; craft-train appends to it"):
        rd.open_append(run / rd.SAMPLES)  # ELOOP once: 'Too many levels of symbolic links' for a plain link
    assert target.read_text() == "export PATH=/usr/bin\n"
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (an optional extra)")
    from craft.callbacks import plot_run

    (run / rd.METRICS).write_text(json.dumps({"step": 1, "loss": 2.0, "lr": 1e-3}) + "\n")
    (run / rd.PLOT).symlink_to(target)
    plot_run(run)
    assert target.read_text() == "export PATH=/usr/bin\n"  # the link was replaced, its target untouched
    assert not (run / rd.PLOT).is_symlink() and (run / rd.PLOT).read_bytes()[:4] == b"\x89PNG"


def test_a_refused_run_leaves_the_users_directory_as_it_was(tmp_path):
    """Its hidden .notes.tmp is not Craft's temp file, and the lock a refused run took goes again."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, text in ((".notes.tmp", "important"), (".draft.1.tmp", "x"), ("README", "keep")):
        (folder / name).write_text(text)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_cli("craft.train", *overrides(folder, empty))
    assert_one_line(result, "craft-train", 2, "is empty")
    assert sorted(p.name for p in folder.iterdir()) == [".draft.1.tmp", ".notes.tmp", "README"]


def test_a_tokenizer_larger_than_any_model_is_refused():
    """A char tokenizer over a corpus of every Unicode character: 1.1M tokens, a 143M-parameter embedding."""
    from types import SimpleNamespace

    from craft.config import ConfigError, load_config
    from craft.train import check_vocab_size

    with pytest.raises(ConfigError, match="the tokenizer has 1,112,291 tokens, more than a model takes"):
        check_vocab_size(load_config("tiny"), SimpleNamespace(vocab_size=1_112_291))


def test_out_of_memory_is_one_line(monkeypatch):
    """torch's CPU allocator raises a RuntimeError with its C++ context: one line, exit 1."""
    from click.testing import CliRunner

    import craft.train

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(craft.train, "train", oom)
    result = CliRunner().invoke(craft.train.main, ["train.max_steps=2"])
    assert result.exit_code == 1 and "out of memory" in result.output and "Traceback" not in result.output
    monkeypatch.setattr(craft.train, "resumed_config", lambda run, overrides: None)
    resumed = CliRunner().invoke(craft.train.main, ["--resume", "runs/x"])  # --overwrite would delete the run
    assert (
        resumed.exit_code == 1
        and "--overwrite" not in resumed.output
        and "--resume runs/x train.batch_size=N" in resumed.output
    )


def test_names_with_unicode_digits_are_not_craft_files(tmp_path):
    """'²'.isdigit() is True but int('²') raises: a stray step-².pt, a sample header '--- step ²'
    or a temp file .x.².tmp in a run directory was a ValueError traceback on resume or export."""
    (tmp_path / "step-000010.pt").write_bytes(b"")
    (tmp_path / "step-\u00b2\u00b3.pt").write_bytes(b"")
    assert ckpt.periodic(tmp_path) == [tmp_path / "step-000010.pt"]
    stray = tmp_path / ".x.onnx.\u00b2\u00b3.abc.tmp"
    stray.write_bytes(b"")
    rd.sweep_temp_files(tmp_path)
    assert stray.exists()  # not a name atomic_file makes: the user's
    (tmp_path / rd.SAMPLES).write_text("--- step 5 ---\nkept\n--- step \u00b2 ---\nalso kept\n--- step 20 ---\ncut\n")
    rd.truncate_samples(tmp_path, 10)
    assert (tmp_path / rd.SAMPLES).read_text() == "--- step 5 ---\nkept\n--- step \u00b2 ---\nalso kept\n"


def test_overwrite_never_deletes_files_of_a_directory_craft_train_did_not_make(tmp_path, small_corpus):
    """A folder with someone's experiment.pt and tokenizer.json: craft-export advised `craft-train
    out_dir=DIR --overwrite`, and following it deleted both. Now nothing advises it, --overwrite is
    refused there, and the refused run leaves no train.lock behind."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "experiment.pt").write_bytes(b"weights")
    (folder / "tokenizer.json").write_text("{}")
    export = run_cli("craft.export.cli", str(folder))
    assert export.returncode == 2 and "--overwrite" not in export.stderr, export.stderr
    for flags in (["--overwrite"], []):
        result = run_cli("craft.train", *overrides(folder, small_corpus), *flags)
        assert_one_line(result, "craft-train", 2, "is not a craft-train run directory")
    assert sorted(p.name for p in folder.iterdir()) == ["experiment.pt", "tokenizer.json"]
    assert (folder / "experiment.pt").read_bytes() == b"weights"
    (folder / "tokenizer.json").unlink()  # a .pt of no name a run writes: a run beside it leaves it alone
    result = run_cli("craft.train", *overrides(folder, small_corpus), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (folder / "experiment.pt").read_bytes() == b"weights" and (folder / rd.CHECKPOINT).is_file()


def test_a_new_run_never_replaces_files_without_overwrite(tmp_path, small_corpus):
    """A new run into a folder holding files a run writes (without a tokenizer) replaced config.yaml,
    samples.txt and metrics.jsonl and deleted step-000777.pt, unasked."""
    mine = {"samples.txt": "s", "metrics.jsonl": '{"mine": 1}', "step-000777.pt": "w"}
    for extra, words in (({}, "holds "), ({"config.yaml": "my: project"}, "already holds a run")):
        folder = tmp_path / f"mine{len(extra)}"
        folder.mkdir()
        for name, text in {**mine, **extra}.items():
            (folder / name).write_text(text)
        result = run_cli("craft.train", *overrides(folder, small_corpus))
        assert_one_line(result, "craft-train", 2, words)
        assert {p.name: p.read_text() for p in folder.iterdir()} == {**mine, **extra}


def test_overwrite_into_a_new_or_empty_out_dir_trains(tmp_path, small_corpus):
    """The README's first command (craft-train --overwrite) on a fresh clone: nothing to replace."""
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        result = run_cli("craft.train", *overrides(out, small_corpus), "--overwrite")
        assert result.returncode == 0, result.stderr
        assert (out / rd.CONFIG).is_file() and (out / rd.CHECKPOINT).is_file()


def test_a_signal_while_importing_is_interrupted_or_terminated_not_a_traceback(monkeypatch, capsys):
    """Ctrl-C while craft-train imported torch (its first second), or craft-run and craft-export click
    and the runtime (their first tenth of one), printed a traceback;
    SIGTERM or Ctrl-C while craft-run imported onnxruntime came back as ImportError('initialization
    failed') from the signal, a traceback with exit 1."""
    import builtins

    import click

    from craft import entry
    from craft.runtime.command import OneLineErrors, Terminated

    real_import = builtins.__import__
    # craft-run and craft-export too: Ctrl-C while click and the runtime imported was a traceback
    starts = ((entry.train, "craft.train"), (entry.run, "craft.runtime.cli"), (entry.export, "craft.export.cli"))
    for start, module in starts:

        def interrupted_import(name, *args, **kwargs):
            if name == module:
                raise KeyboardInterrupt
            return real_import(name, *args, **kwargs)

        monkeypatch.delitem(sys.modules, module, raising=False)
        monkeypatch.setattr(builtins, "__import__", interrupted_import)
        with pytest.raises(SystemExit) as done:
            start()
        monkeypatch.setattr(builtins, "__import__", real_import)
        assert done.value.code == 130 and capsys.readouterr().err == "\ninterrupted\n", module

    for signalled, code, line in ((Terminated(15), 143, "prog: terminated"), (KeyboardInterrupt(), 130, "interrupted")):

        @click.command(cls=OneLineErrors)
        def command():
            try:
                raise signalled
            except BaseException as cause:
                raise ImportError("initialization failed") from cause

        with pytest.raises(SystemExit) as done:
            command.main([], prog_name="prog")
        assert done.value.code == code and capsys.readouterr().err.strip() == line


@pytest.mark.parametrize("existing", [False, True], ids=["new out_dir", "existing empty out_dir"])
def test_ctrl_c_after_tokenizing_before_the_config_leaves_nothing(tmp_path, small_corpus, monkeypatch, existing):
    """Ctrl-C while a large model was being built (after the tokens, before config.yaml) left a
    directory that the same command refused ("already holds a run") and --resume refused too."""
    from craft import train as T
    from craft.config import load_config

    out = tmp_path / "run"
    if existing:
        out.mkdir()
    cfg = load_config(None, overrides(out, small_corpus))

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "new_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, log=lambda *a, **k: None)
    assert (sorted(out.iterdir()) == []) if existing else not out.exists()
    monkeypatch.undo()
    assert T.train(load_config(None, overrides(out, small_corpus)), log=lambda *a, **k: None)  # the same command


def test_a_run_killed_while_tokenizing_can_be_started_again(tmp_path, small_corpus):
    """SIGKILL while tokenizing leaves the tokenizer and train.lock, no config.yaml / data.json /
    tokens.bin: its own lock marks it as craft-train's, so --overwrite replaces it (it was refused
    as 'not a craft-train run directory' while --resume's message advised --overwrite)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / rd.CHAR_TOKENIZER).write_text("{}")
    (out / rd.LOCK).write_text("")
    again = run_cli("craft.train", *overrides(out, small_corpus))
    line = assert_one_line(again, "craft-train", 2, "holds a run that never began training", "--overwrite")
    assert "--resume" not in line  # which would refuse it: there is no config.yaml to resume
    result = run_cli("craft.train", *overrides(out, small_corpus), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (out / rd.CONFIG).is_file()


def test_out_of_memory_is_one_line_exit_1(capsys, monkeypatch, char_int8):
    """Running out of memory (numpy's MemoryError naming its array, a bare one from file.read) was a
    traceback; ONNX Runtime's std::bad_alloc while loading was 'cannot load it ... re-export', exit 2."""
    import click
    import onnxruntime as ort

    from craft.runtime.command import OneLineErrors
    from craft.runtime.generator import Generator

    fix = "; close other programs or choose a smaller model or context\n"
    torch_says = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried"
    for error, detail in (
        (MemoryError("no 6 MiB"), " (no 6 MiB)"),
        (MemoryError(), ""),
        (RuntimeError(torch_says + "\nto allocate 64 GB."), f" ({torch_says} to allocate 64 GB.)"),
    ):  # torch's allocator raises RuntimeError (a 43-line traceback from an import that claimed 64 GB)

        @click.command(cls=OneLineErrors)
        def command():
            raise error

        with pytest.raises(SystemExit) as done:
            command.main([], prog_name="prog")
        err = capsys.readouterr().err
        assert done.value.code == 1 and err == f"prog: error: out of memory{detail}{fix}"

    def no_memory(*args, **kwargs):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(ort, "InferenceSession", no_memory)
    with pytest.raises(MemoryError, match="ONNX Runtime could not allocate the memory to load"):
        Generator(char_int8)


def test_threads_are_capped_at_the_usable_cpus(char_int8):
    """ONNX Runtime that cannot start a thread (a memory or process limit) hangs in its constructor,
    deaf to SIGTERM: --threads 1024 under `ulimit -v` hung craft-run for ten minutes."""
    from craft.runtime.estimate import usable_cpus
    from craft.runtime.generator import Generator

    gen = Generator(char_int8, threads=1024)
    assert gen.backend.session.get_session_options().intra_op_num_threads == usable_cpus()


def test_a_file_onnx_runtime_refuses_prints_nothing_on_stdout(capfd, monkeypatch, char_int8):
    """onnxruntime prints an 'EP Error' banner to stdout (into the text or --json) when loading fails
    with ValueError / RuntimeError, then loads the file again."""
    import onnxruntime as ort

    from craft.runtime.artifact import ArtifactError
    from craft.runtime.generator import Generator

    def damaged(self, *args, **kwargs):  # what a damaged attribute name gives
        self._fallback_providers = ["CPUExecutionProvider"]
        raise UnicodeDecodeError("utf-8", b"\xc7", 0, 1, "invalid continuation byte")

    monkeypatch.setattr(ort.InferenceSession, "_create_inference_session", damaged)
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load it"):
        Generator(char_int8)
    assert capfd.readouterr().out == ""


def test_names_that_are_not_utf8(tmp_path):
    """An out_dir that is not UTF-8 was TensorBoard's UnicodeEncodeError traceback (after the run's
    first files were written); a corpus file named so was one in the corpus fingerprint."""
    import importlib.util

    from craft.data import Corpus

    if importlib.util.find_spec("tensorboard") is not None:  # the path works without it
        with pytest.raises(rd.RunDirError, match=r"out_dir=.*o\\xff is not UTF-8 text"):
            rd.check_out_dir(tmp_path / os.fsdecode(b"o\xff"))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / os.fsdecode(b"caf\xe9.txt")).write_text("some text\n")
    assert len(Corpus(str(tmp_path / "corpus")).fingerprint()) == 64


def test_a_long_legal_file_name_can_be_written(tmp_path):
    """A 250-byte name is legal, but the temp file beside it (.NAME.PID.random.tmp) ran past the 255
    bytes a name may have: 'File name too long; choose another -o'. Its sweep still finds it."""
    from craft.export.exporter import check_output_path

    for name in ("x" * 250, "\u00e9" * 125):  # 250 bytes either way
        target = tmp_path / name
        check_output_path(target)
        rd.atomic_write_bytes(target, b"data")
        assert target.read_bytes() == b"data" and [p.name for p in tmp_path.iterdir()] == [name]
        target.unlink()
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f".{rd.temp_stem('x' * 250)}.{gone.pid}.abcdefgh.tmp"
    stale.write_bytes(b"partial")
    rd.sweep_temp_files(tmp_path, "x" * 250)
    assert not stale.exists()


def test_a_craft_train_refused_the_lock_never_removes_it(tmp_path, small_corpus, monkeypatch):
    """The second of two new runs, refused the lock, deleted the first one's train.lock when it had
    looked before the first created it: a third run then wrote the same directory at once."""
    from pathlib import Path

    from craft import train as T
    from craft.config import load_config

    out = tmp_path / "run"
    out.mkdir()
    holder = rd.RunLock(out)
    holder.acquire()  # a running craft-train
    try:
        real_exists = Path.exists
        monkeypatch.setattr(Path, "exists", lambda p: p.name != rd.LOCK and real_exists(p))  # looked too early
        with pytest.raises(rd.RunDirError, match="in use by another craft-train"):
            T.train(load_config(None, overrides(out, small_corpus)), log=lambda *a, **k: None)
        monkeypatch.undo()
        assert holder.path.is_file()
        third = rd.RunLock(out)
        with pytest.raises(rd.RunDirError, match="in use by another craft-train"):
            third.acquire()
    finally:
        holder.release()


def test_a_full_disk_under_the_run_logs_names_the_file(tmp_path, monkeypatch):
    """A write to metrics.jsonl or samples.txt that fails (a full disk) was 'No space left on device'
    naming no file, and closing the log raised a second error that skipped TensorBoard's close."""
    from craft.callbacks import MetricsLog

    log = MetricsLog(tmp_path)
    real = log.file.file

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            self.write("")

        close = flush

    log.file.file = Full()
    with pytest.raises(OSError) as e:
        log.write({"event": "train", "step": 1, "loss": 1.0})
    assert e.value.filename == str(tmp_path / rd.METRICS)
    log.close()  # no second error
    real.close()


def test_resume_of_a_missing_run_says_it_does_not_exist(tmp_path):
    """It said 'has no config.yaml: not a craft-train run directory' for a typo in the path."""
    result = run_cli("craft.train", "--resume", str(tmp_path / "nope"))
    assert_one_line(result, "craft-train", 2, "nope does not exist; check the path")


def test_a_model_that_cannot_fit_in_memory_is_refused_before_it_is_built(tmp_path, small_corpus, monkeypatch):
    """Building a 30G-parameter model (dims within bounds) was killed by the kernel at 24 GB: exit
    137, no message. Its size is counted on the meta device first."""
    from craft import train as T
    from craft.config import ConfigError, load_config
    from craft.runtime import estimate

    monkeypatch.setattr(estimate, "available_memory_mb", lambda: 1.0)  # a model of ~1M parameters needs ~16 MB
    with pytest.raises(ConfigError, match=r"parameters needs about .* GB to train .* more than the 0.0 GB free"):
        T.train(load_config(None, overrides(tmp_path / "run", small_corpus)), log=lambda *a, **k: None)
    assert not (tmp_path / "run").exists()


def shadowing(tmp_path, *packages: str) -> dict:
    """An environment in which `packages` cannot be imported, as on an install without them."""
    shadow = tmp_path / "shadow"
    shadow.mkdir(exist_ok=True)
    (shadow / "sitecustomize.py").write_text("".join(f"import sys; sys.modules[{p!r}] = None\n" for p in packages))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("argv", [["craft.entry", "--help"], ["craft.export.cli", "RUN"]], ids=["train", "export"])
def test_a_device_install_without_torch_says_what_to_install(tmp_path, argv):
    """The runtime alone (pip install craft) installs craft-train and craft-export too: they died with
    a ModuleNotFoundError traceback, even for --help."""
    module, *args = argv
    code = "from craft.entry import train; train()" if module == "craft.entry" else f"import {module} as m; m.main()"
    result = subprocess.run(
        [sys.executable, "-c", code, *[str(tmp_path) if a == "RUN" else a for a in args]],
        capture_output=True,
        text=True,
        timeout=120,
        env=shadowing(tmp_path, "torch"),
    )
    assert_one_line(result, "craft-train" if module == "craft.entry" else "craft-export", 1, "'torch' is not installed")
    assert """install torch's CPU build, then pip install -e ".[train]" in Craft's checkout""" in result.stderr


def test_a_name_longer_than_the_file_system_allows_is_bad_input_on_a_short_line(tmp_path, small_corpus):
    """A 300-character name in --config, extends:, data.path or out_dir was exit 1 (an OS error) and a
    line of the whole name, with no fix."""
    long = "a" * 300
    (tmp_path / "c.yaml").write_text(f"extends: {long}\n")
    for args in (
        ["--config", str(tmp_path / "c.yaml"), f"out_dir={tmp_path / 'r1'}"],
        [f"data.path={tmp_path / long}.txt", f"out_dir={tmp_path / 'r2'}"],
        [*overrides(tmp_path / long, small_corpus)],
    ):
        result = run_cli("craft.train", *args)
        line = assert_one_line(result, "craft-train", 2, "File name too long; a name in the path is longer than")
        assert len(line) < 400 and "..." in line, line


def test_a_deleted_current_directory_is_one_line(tmp_path, small_corpus):
    """torch's import died in oneMKL ('Cannot load libtorch_cpu.so', exit 2) whatever the paths given."""
    gone = tmp_path / "gone"
    gone.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", "from craft.entry import train; train()", *overrides(tmp_path / "run", small_corpus)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=gone,
        preexec_fn=lambda: os.rmdir(gone),  # runs in the child after its chdir: the directory goes under it
    )
    assert_one_line(result, "craft-train", 1, "the current directory no longer exists")


NATIVE_OUT_OF_MEMORY = [  # measured under ulimit -v: torch's and onnxruntime's imports, ORT starting its threads
    "libtorch_cpu.so: failed to map segment from shared object",
    "Exception caught: std::bad_alloc",
    "pthread_create failed, error code: 12 error msg: Cannot allocate memory",
]


@pytest.mark.parametrize("message", NATIVE_OUT_OF_MEMORY)
def test_a_library_that_cannot_load_for_want_of_memory_is_one_line(message, capsys):
    """Under a memory limit the imports of torch / onnxruntime raised ImportError tracebacks (the entry
    points, and onnxruntime's lazy import inside a command); now "out of memory", exit 1."""
    import click

    from craft.entry import imported
    from craft.runtime.command import OneLineErrors, memory_failure

    assert memory_failure(ImportError(message)) and not memory_failure(ImportError(f"{message} in model 'x.onnx'"))

    def load():
        raise ImportError(message)

    with pytest.raises(SystemExit) as e:
        imported(load, "craft-x")
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("craft-x: error: out of memory"), err

    @click.command(cls=OneLineErrors)
    def command():
        raise ImportError(message)

    with pytest.raises(SystemExit) as e:
        command.main(args=[], prog_name="craft-y")
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("craft-y: error: out of memory"), err


def test_an_import_that_fails_for_another_reason_is_not_called_memory():
    from craft.entry import imported

    def load():
        raise ImportError("cannot import name 'main' from 'craft.train'")

    with pytest.raises(ImportError, match="cannot import name"):
        imported(load, "craft-x")
