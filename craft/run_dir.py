"""The run directory that craft-train writes and craft-export reads (see DESIGN.md).

    runs/NAME/
      config.yaml        fully resolved configuration
      tokenizer.model    sentencepiece model  (or tokenizer.json for the char tokenizer)
      checkpoint.pt      latest checkpoint (what it holds: checkpoint.py)
      step-NNNNNN.pt     periodic checkpoints, the last `train.keep_last` kept
      best.pt            lowest val loss so far
      metrics.jsonl      one JSON object per logged step / eval
      samples.txt        text sampled during training
      tokens.bin         tokenized corpus (memory-mapped), data.json describes it (data.py)

Every file is written atomically (temp file, fsync, rename), so a kill at any moment leaves the
previous good version in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CONFIG = "config.yaml"
SP_TOKENIZER = "tokenizer.model"
CHAR_TOKENIZER = "tokenizer.json"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
SAMPLES = "samples.txt"
PLOT = "loss.png"
TENSORBOARD_GLOB = "events.out.tfevents.*"
SAMPLE_HEADER = "--- step {step}"


class RunDirError(ValueError):
    """A run directory that is missing, incomplete or inconsistent; one line naming the fix."""


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make renames in `directory` durable (a no-op where directories cannot be fsynced)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def tokenizer_path(run_dir: Path) -> Path | None:
    for name in (SP_TOKENIZER, CHAR_TOKENIZER):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def remove_temp_files(run_dir: Path) -> None:
    """Temp files of writes that a kill interrupted (the files they were replacing are intact)."""
    for path in Path(run_dir).glob(".*.tmp"):
        path.unlink(missing_ok=True)
    (Path(run_dir) / f".{CHECKPOINT}.link").unlink(missing_ok=True)


@contextmanager
def new_run(run_dir: Path) -> Iterator[Path]:
    """Create run_dir for a new run's first files; if the body raises (a corpus too short for
    the context, ...), remove what it made - the directories it created, or the files it added to
    one that was already there - so the corrected rerun is not refused."""
    run_dir = Path(run_dir)
    created = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    existed = set(run_dir.iterdir()) if created is None else set()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield run_dir
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            for path in set(run_dir.iterdir()) - existed:
                path.unlink(missing_ok=True)
        raise


def clear_run(run_dir: Path) -> None:
    """What a new run in an old run directory replaces (the token file is kept: prepare_tokens
    reuses it only when the corpus and tokenizer are unchanged)."""
    run_dir = Path(run_dir)
    stale = [*run_dir.glob("*.pt"), *run_dir.glob(TENSORBOARD_GLOB)]
    stale += [run_dir / name for name in (CHAR_TOKENIZER, SP_TOKENIZER, METRICS, SAMPLES, PLOT)]
    for path in stale:
        path.unlink(missing_ok=True)


def truncate_samples(run_dir: Path, step: int) -> None:
    """Drop samples.txt entries written after `step` (by a run killed after its last checkpoint)."""
    path = Path(run_dir) / SAMPLES
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    prefix = SAMPLE_HEADER.format(step="")
    cut = None
    pos = 0 if text.startswith(prefix) else text.find("\n" + prefix)
    while pos != -1:
        start = pos if text.startswith(prefix, pos) else pos + 1
        digits = text[start + len(prefix):].split(" ", 1)[0]
        if digits.isdigit() and int(digits) > step:
            cut = start
            break
        pos = text.find("\n" + prefix, start + 1)
    if cut is not None:
        atomic_write_bytes(path, text[:cut].encode("utf-8"))
