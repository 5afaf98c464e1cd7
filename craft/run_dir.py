"""The run directory that craft-train writes and craft-export reads (see DESIGN.md).

    runs/NAME/
      config.yaml        fully resolved configuration
      tokenizer.model    sentencepiece model  (or tokenizer.json for the char tokenizer)
      checkpoint.pt      latest checkpoint (model, optimizer, scheduler, step, data position, RNG)
      step-NNNNNN.pt     earlier periodic checkpoints, the last `train.keep_last` kept
      best.pt            lowest val loss so far
      metrics.jsonl      one JSON object per logged step / eval
      samples.txt        text sampled during training
      train.bin, val.bin tokenized corpus (memory-mapped), data.json describes them

Every file is written atomically (temp file, fsync, rename), so a kill at any moment leaves the
previous good version in place. Checkpoints carry a SHA-256 of their payload so a truncated or
corrupted file is detected on load.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

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
CHECKPOINT_FORMAT = 1


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


def save_checkpoint(state: dict[str, Any], path: Path) -> str:
    """Serialize `state` with torch.save, prefix a SHA-256 of it, write atomically; returns the hash.

    File layout: b"CRAFTCKPT1\\n" + 64 hex chars + b"\\n" + torch.save payload.
    """
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    atomic_write_bytes(path, _MAGIC + digest.encode() + b"\n" + payload)
    return digest


_MAGIC = b"CRAFTCKPT1\n"


def load_checkpoint(path: Path) -> tuple[dict[str, Any], str]:
    """(state, sha256) of a checkpoint written by save_checkpoint; RunDirError if damaged.

    Loaded with weights_only=True: a checkpoint is data, never code.
    """
    import torch

    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise RunDirError(f"cannot read checkpoint {path}: {e.strerror}") from None
    head = len(_MAGIC) + 65
    if not blob.startswith(_MAGIC) or len(blob) < head:
        raise RunDirError(f"{path} is not a Craft checkpoint (bad header); it may be truncated")
    digest = blob[len(_MAGIC):head - 1].decode("ascii", "replace")
    payload = memoryview(blob)[head:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise RunDirError(f"{path} is corrupted or truncated (SHA-256 mismatch)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # a valid hash but unreadable payload: written by another torch?
        raise RunDirError(f"{path} could not be loaded by torch ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunDirError(f"{path} has checkpoint format {state.get('format') if isinstance(state, dict) else '?'}, expected {CHECKPOINT_FORMAT}")
    return state, digest


def checkpoint_step(path: Path) -> int:
    """The step in a step-NNNNNN.pt name."""
    return int(path.stem.split("-", 1)[1])


def periodic_checkpoints(run_dir: Path) -> list[Path]:
    """step-NNNNNN.pt files, newest (highest step) first."""
    found = [p for p in Path(run_dir).glob("step-*.pt") if p.stem.split("-", 1)[1].isdigit()]
    return sorted(found, key=checkpoint_step, reverse=True)


def save_periodic_checkpoint(state: dict[str, Any], run_dir: Path, step: int, keep_last: int) -> str:
    """Write step-NNNNNN.pt, point checkpoint.pt at it, prune all but the newest keep_last.

    checkpoint.pt is a hard link to the newest step file (one write, two names; replaced by an
    atomic rename), or a second copy where the filesystem has no hard links.
    """
    numbered = run_dir / f"step-{step:06d}.pt"
    digest = save_checkpoint(state, numbered)
    link = run_dir / f".{CHECKPOINT}.link"
    link.unlink(missing_ok=True)
    try:
        os.link(numbered, link)
        os.replace(link, run_dir / CHECKPOINT)
        fsync_dir(run_dir)
    except OSError:  # no hard links here (some network / FAT filesystems)
        save_checkpoint(state, run_dir / CHECKPOINT)
    for old in periodic_checkpoints(run_dir)[keep_last:]:
        old.unlink(missing_ok=True)
    return digest


def load_latest_checkpoint(run_dir: Path, warn=print) -> tuple[dict[str, Any], str, Path]:
    """The newest loadable checkpoint: checkpoint.pt, else the periodic ones, newest first.

    A damaged file is skipped with a warning naming it; RunDirError if none loads.
    """
    candidates: list[Path] = []
    for path in [run_dir / CHECKPOINT] + periodic_checkpoints(run_dir):
        if path.is_file() and not any(os.path.samefile(path, seen) for seen in candidates):
            candidates.append(path)  # checkpoint.pt and its step file are one file: read it once
    if not candidates:
        raise RunDirError(f"{run_dir} has no checkpoint ({CHECKPOINT}); train one with: craft-train out_dir={run_dir}")
    errors = []
    for path in candidates:
        try:
            state, digest = load_checkpoint(path)
            if errors:
                warn(f"warning: {'; '.join(errors)}; using {path.name} (step {state.get('step')}) instead")
            return state, digest, path
        except RunDirError as e:
            errors.append(str(e))
    raise RunDirError(f"no loadable checkpoint in {run_dir}: {'; '.join(errors)}")


def drop_checkpoints_after(run_dir: Path, step: int) -> None:
    """Remove step files past `step` (the damaged ones a resume skipped), so pruning and later
    fallbacks only see checkpoints of the run as it continues."""
    for path in periodic_checkpoints(run_dir):
        if checkpoint_step(path) > step:
            path.unlink(missing_ok=True)


def remove_temp_files(run_dir: Path) -> None:
    """Temp files of writes that a kill interrupted (the files they were replacing are intact)."""
    for path in Path(run_dir).glob(".*.tmp"):
        path.unlink(missing_ok=True)
    (Path(run_dir) / f".{CHECKPOINT}.link").unlink(missing_ok=True)


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
