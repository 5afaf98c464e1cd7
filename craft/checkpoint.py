"""What a checkpoint holds, and how it is written and read back (the only module that does either).

A checkpoint is a dict saved with torch.save and loaded with weights_only=True (data, never code):

    format, craft_version, config    what wrote it (config: the resolved Config as a dict)
    model, optimizer, scheduler      their state_dicts
    step                             optimizer steps taken
    step_done                        False when a signal abandoned that step's eval: a resume runs
                                     its eval and sample before the next step (absent: true)
    best_val_loss, early_stopping    the lowest val loss so far (best.pt) and EarlyStopping's state
    elapsed_s                        training seconds so far (a resumed run adds to them)
    rng {data, torch, cuda}          one entry per process: the numpy generator that picks the data
                                     windows (the data position), torch's CPU and CUDA RNG states

File: b"CRAFTCKPT1\\n" + SHA-256 hex of the payload + b"\\n" + the torch.save payload, written
atomically, so a truncated or corrupted file is detected on load. In the run directory:
step-NNNNNN.pt (the newest train.keep_last of them), checkpoint.pt (a hard link to the newest)
and best.pt (lowest val loss).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craft import __version__
from craft.callbacks import EarlyStopping
from craft.config import Config
from craft.distributed import Distributed
from craft.run_dir import BEST, CHECKPOINT, CONFIG, RunDirError, atomic_write_bytes, fsync_dir, step_files

FORMAT = 1
MAGIC = b"CRAFTCKPT1\n"


@dataclass
class TrainState:
    """Everything a training run changes as it goes: what a checkpoint saves and restores."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data_rng: np.random.Generator  # which windows come next: this process's data position
    stopper: EarlyStopping
    step: int = 0
    step_done: bool = True  # False: step trained, its eval (abandoned for a signal) and sample still to do
    best_val: float = math.inf
    elapsed_before: float = 0.0  # training seconds of the runs this one continues
    started: float = field(default_factory=time.perf_counter)  # when this process began training

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


# --- the training state <-> a checkpoint -------------------------------------------------------


def save(state: TrainState, cfg: Config, dist: Distributed, *, best: bool = False) -> None:
    """Checkpoint `state` into cfg.out_dir: best.pt, or step-NNNNNN.pt + checkpoint.pt.

    Every rank calls this (each one's RNG states are gathered); rank 0 alone writes.
    """
    cuda = dist.device.type == "cuda"
    rngs = dist.gather(
        {
            "data": state.data_rng.bit_generator.state,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state().cpu() if cuda else None,
        }
    )
    if not dist.main:
        return
    payload = {
        "format": FORMAT,
        "craft_version": __version__,
        "config": cfg.to_dict(),
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "step": state.step,
        "step_done": state.step_done,
        "best_val_loss": state.best_val,
        "early_stopping": state.stopper.state_dict(),
        "elapsed_s": state.elapsed_s,
        "rng": {
            "data": [r["data"] for r in rngs],
            "torch": [r["torch"] for r in rngs],
            "cuda": [r["cuda"] for r in rngs] if cuda else [],
        },
    }
    run_dir = Path(cfg.out_dir)
    if best:
        write(payload, run_dir / BEST)
    else:
        write_periodic(payload, run_dir, state.step, cfg.train.keep_last)


def config_change(saved: Any, cfg: Config) -> str | None:
    """The first model.* or tokenizer.* value in which `cfg` differs from a checkpoint's saved config
    ('model.context_length=32 where the checkpoint was trained with 16'), or None. Keys the saved
    config predates are not compared."""
    if not isinstance(saved, dict):
        return None
    now = cfg.to_dict()
    for section in ("model", "tokenizer"):
        before = saved.get(section)
        if not isinstance(before, dict):
            continue
        for key, value in before.items():
            if key in now[section] and now[section][key] != value:
                shown = repr(value)[:40]
                return f"{section}.{key}={now[section][key]!r} where the checkpoint was trained with {shown}"
    return None


def resume(state: TrainState, cfg: Config, dist: Distributed, log=print) -> tuple[Path, str]:
    """Load the newest good checkpoint of cfg.out_dir into `state`; returns (its path, its SHA-256).

    Written by as many processes as this run has: every RNG continues exactly. Otherwise the
    run goes on from fresh data seeds, with a warning.
    """
    saved, digest, path = read_latest(Path(cfg.out_dir), warn=log)
    changed = config_change(saved.get("config"), cfg)
    if changed:  # config.yaml edited since: resumed_config refuses the same change given as an override
        raise RunDirError(
            f"{Path(cfg.out_dir) / CONFIG} has {changed}; --resume cannot change model.* or tokenizer.*: "
            f"restore config.yaml, or start a new run with another out_dir=..."
        )
    rngs = saved["rng"]
    if isinstance(rngs["torch"], torch.Tensor):  # written by craft 0.1.0's first trainer: one torch state
        rngs = {**rngs, "torch": [rngs["torch"]] * len(rngs["data"])}
    try:  # read() checked the types; what is inside them is checked by the objects that take them
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        state.stopper.load_state_dict(saved["early_stopping"])
        if len(rngs["data"]) == dist.world:
            state.data_rng.bit_generator.state = rngs["data"][dist.rank]
            torch.set_rng_state(rngs["torch"][dist.rank])
            if dist.device.type == "cuda" and rngs.get("cuda"):
                torch.cuda.set_rng_state(rngs["cuda"][dist.rank])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        first = " ".join(str(e).split())[:200]
        raise RunDirError(
            f"{path} is damaged: it does not fit this run ({type(e).__name__}: {first}); use another checkpoint "
            "or start again with --overwrite"
        ) from None
    state.step, state.best_val = saved["step"], saved["best_val_loss"]
    state.step_done = saved.get("step_done", True)  # absent in checkpoints older than the field
    state.elapsed_before = saved.get("elapsed_s", 0.0)
    if len(rngs["data"]) != dist.world:
        log(
            f"warning: {path.name} was written by {len(rngs['data'])} processes, this run has {dist.world}; "
            "data order continues from fresh seeds (not an exact continuation)"
        )
        state.data_rng = np.random.default_rng([cfg.train.seed, dist.rank, state.step])
    return path, digest


# --- checkpoint files --------------------------------------------------------------------------


def write(payload: dict[str, Any], path: Path) -> str:
    """torch.save `payload`, prefix the SHA-256 of it, write atomically; returns the hash."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, MAGIC + digest.encode() + b"\n" + data)
    return digest


def read(path: Path) -> tuple[dict[str, Any], str]:
    """(payload, sha256) of a file written by write(); RunDirError if it is damaged. The header is
    checked before the file is read whole: a 5 GB file of anything took 5 GB to be called "bad header"."""
    head = len(MAGIC) + 65
    try:
        with open(path, "rb") as f:
            if f.read(head)[: len(MAGIC)] != MAGIC:
                raise RunDirError(f"{path} is not a Craft checkpoint (bad header); it may be truncated")
            f.seek(0)
            blob = f.read()
    except OSError as e:
        raise RunDirError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if len(blob) < head:
        raise RunDirError(f"{path} is not a Craft checkpoint (bad header); it may be truncated")
    digest = blob[len(MAGIC) : head - 1].decode("ascii", "replace")
    data = memoryview(blob)[head:]
    if hashlib.sha256(data).hexdigest() != digest:
        raise RunDirError(f"{path} is corrupted or truncated (SHA-256 mismatch)")
    problem = zip_problem(io.BytesIO(data), len(data))
    if problem:
        raise RunDirError(f"{path} is damaged: {problem}; use another checkpoint or start again with --overwrite")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them: the error says it
            warnings.simplefilter("ignore")
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: never point there
        raise RunDirError(
            f"{path} holds Python objects besides tensors and plain data; Craft loads checkpoints as data only "
            "and refused it - use a checkpoint that craft-train wrote"
        ) from None
    except Exception as e:  # a valid hash but unreadable payload: written by another torch?
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise RunDirError(f"{path} could not be loaded by torch ({type(e).__name__}: {first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RunDirError(
            f"{path} has checkpoint format {payload.get('format') if isinstance(payload, dict) else '?'}, "
            f"expected {FORMAT}"
        )
    problem = payload_problem(payload)
    if problem:  # the hash is no signature: anyone can write a well-formed file with other contents
        raise RunDirError(f"{path} is damaged: {problem}; use another checkpoint or start again with --overwrite")
    return payload, digest


def zip_problem(file, size: int) -> str | None:
    """What in a torch.save zip archive of `size` bytes is not what torch.save writes, or None:
    torch.save stores its records uncompressed, so a record that claims to inflate (a 3.5 MB file
    that torch.load inflated to 6.5 GB), or records larger than the archive, is a crafted file.
    Not a zip: None (torch.load says what it is)."""
    import zipfile

    try:
        with zipfile.ZipFile(file) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if packed:
        return f"its record {packed[0][:100]!r} is compressed, which torch.save never does"
    if sum(r.file_size for r in records) > size:
        return f"its records claim {sum(r.file_size for r in records):,} bytes in a {size:,}-byte archive"
    return None


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what a model's weights may be stored as


def payload_problem(payload: dict[str, Any]) -> str | None:
    """What in a checkpoint's contents is not what save() writes (types only; the model's shapes are
    checked against its config where it is loaded), or None."""

    def is_number(value) -> bool:
        return type(value) in (int, float)

    model = payload.get("model")
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided for k, v in model.items()
    ):
        return "'model' is not a mapping of names to dense tensors"
    # save() writes float32; a complex tensor lost its imaginary part on export, a float8 one was a traceback
    odd = next((k for k, v in model.items() if v.dtype not in WEIGHT_DTYPES), None)
    if odd is not None:
        return f"weight '{odd[:80]}' is {str(model[odd].dtype).removeprefix('torch.')}, not a float32/16 tensor"
    if type(payload.get("step")) is not int or payload["step"] < 0:
        return f"'step' is {str(payload.get('step'))[:40]!r}, not a count >= 0"
    if type(payload.get("step_done", True)) is not bool:
        return f"'step_done' is {str(payload.get('step_done'))[:40]!r}, not true or false"
    if not is_number(payload.get("best_val_loss")) or not is_number(payload.get("elapsed_s", 0.0)):
        return "'best_val_loss' or 'elapsed_s' is not a number"
    for key in ("optimizer", "scheduler", "early_stopping"):
        if not isinstance(payload.get(key), dict):
            return f"'{key}' is not a mapping"
    rng = payload.get("rng")
    if (
        not isinstance(rng, dict)
        or not isinstance(rng.get("data"), list)
        or not all(isinstance(r, dict) for r in rng["data"])
        or not (isinstance(rng.get("torch"), torch.Tensor) or isinstance(rng.get("torch"), list))
        or (isinstance(rng["torch"], list) and len(rng["torch"]) != len(rng["data"]))
    ):
        return "'rng' is not the random-number states save() writes"
    return None


def step_of(path: Path) -> int:
    """The step in a step-NNNNNN.pt name."""
    return int(path.stem.split("-", 1)[1])


def periodic(run_dir: Path) -> list[Path]:
    """step-NNNNNN.pt files, newest (highest step) first."""
    return sorted(step_files(run_dir), key=step_of, reverse=True)


def write_periodic(payload: dict[str, Any], run_dir: Path, step: int, keep_last: int) -> str:
    """Write step-NNNNNN.pt, point checkpoint.pt at it, prune all but the newest keep_last.

    checkpoint.pt is a hard link to the newest step file (one write, two names; replaced by an
    atomic rename), or a second copy where the filesystem has no hard links.
    """
    numbered = run_dir / f"step-{step:06d}.pt"
    digest = write(payload, numbered)
    link = run_dir / f".{CHECKPOINT}.link"
    link.unlink(missing_ok=True)
    try:
        os.link(numbered, link)
        os.replace(link, run_dir / CHECKPOINT)
        fsync_dir(run_dir)
    except OSError:  # no hard links here (some network / FAT filesystems), or checkpoint.pt is no file
        link.unlink(missing_ok=True)
        write(payload, run_dir / CHECKPOINT)
    for old in periodic(run_dir)[keep_last:]:
        old.unlink(missing_ok=True)
    return digest


def read_latest(run_dir: Path, warn=print) -> tuple[dict[str, Any], str, Path]:
    """The newest loadable checkpoint: checkpoint.pt (unless a step file is newer), else the periodic
    ones, newest first.

    A damaged file is skipped with a warning naming it; RunDirError if none loads.
    """
    candidates: list[Path] = []
    for path in [run_dir / CHECKPOINT] + periodic(run_dir):
        if path.is_file() and not any(os.path.samefile(path, seen) for seen in candidates):
            candidates.append(path)  # checkpoint.pt and its step file are one file: read it once
    if not candidates:
        if (run_dir / BEST).is_file():  # --overwrite would delete it
            raise RunDirError(
                f"{run_dir} has no {CHECKPOINT} or step file, only {BEST}; to resume from it: "
                f"cp {run_dir / BEST} {run_dir / CHECKPOINT}"
            )
        raise RunDirError(  # --overwrite: a run that stopped before its first save "already holds a run"
            f"{run_dir} has no checkpoint ({CHECKPOINT}): its training never saved one; start it again with: "
            f"craft-train out_dir={run_dir} --overwrite"
        )
    errors = []
    for path in candidates:
        try:
            payload, digest = read(path)
        except RunDirError as e:
            errors.append(str(e))
            continue
        if path.name == CHECKPOINT:  # the others are step files, newest first
            for newer in [p for p in candidates[1:] if step_of(p) > payload["step"]]:
                try:  # killed between writing step-N.pt and re-pointing checkpoint.pt at it
                    newer_payload, newer_digest = read(newer)
                except RunDirError as e:
                    errors.append(str(e))
                    continue
                warn(
                    f"warning: {CHECKPOINT} is step {payload['step']}, older than {newer.name} (a run stopped "
                    f"between writing the one and re-pointing the other); using {newer.name}"
                )
                return newer_payload, newer_digest, newer
        if errors:
            warn(f"warning: {'; '.join(errors)}; using {path.name} (step {payload.get('step')}) instead")
        return payload, digest, path
    raise RunDirError(f"no loadable checkpoint in {run_dir}: {'; '.join(errors)}")


def drop_after(run_dir: Path, step: int) -> None:
    """Remove step files past `step` (the damaged ones a resume skipped), so pruning and later
    fallbacks only see checkpoints of the run as it continues."""
    for path in periodic(run_dir):
        if step_of(path) > step:
            path.unlink(missing_ok=True)
