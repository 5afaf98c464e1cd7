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
      train.lock         flock'ed by the craft-train writing the run; holds its pid

Every file is written atomically (temp file, fsync, rename), so a kill at any moment leaves the
previous good version in place. A temp file is named .NAME.PID.XXXX.tmp: removed by its writer
on any exception or SIGTERM, and by sweep_temp_files once that process is gone (a SIGKILL).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

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
LOCK = "train.lock"
TOKENS = "tokens.bin"  # the corpus's token ids (craft.data)
DATA_INFO = "data.json"  # what TOKENS was made from: corpus, tokenizer, split (craft.data)
TEMP_SUFFIX = ".tmp"
TEMP_NAME_BYTES = 200  # of a target's name in its temp file's name: room for .PID.random.tmp under 255


class RunDirError(ValueError):
    """A run directory that is missing, incomplete or inconsistent; one line naming the fix."""


MAX_SMALL_FILE_BYTES = 64 << 20  # configs, tokenizers, chat templates: real ones are kilobytes to ~35 MB


def read_small(path: str | os.PathLike) -> bytes:
    """The bytes of a config, tokenizer or template file; OSError (EFBIG) before reading one larger than
    MAX_SMALL_FILE_BYTES: a crafted 3 GB config.json took 6.5 GB to be called "not readable JSON"."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_SMALL_FILE_BYTES:
            raise OSError(
                errno.EFBIG,
                f"{size:,} bytes, more than the {MAX_SMALL_FILE_BYTES >> 20} MB such a file ever is",
                os.fspath(path),
            )
        return f.read(MAX_SMALL_FILE_BYTES + 1)


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    with atomic_file(path) as f:
        f.write(data)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` (fsync, rename) when the block ends; on any exception
    (an OSError, KeyboardInterrupt, SIGTERM's Terminated) the temp file is removed and `path` is
    untouched. An OSError names `path` (not the temp file)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{temp_stem(path.name)}.{os.getpid()}.", suffix=TEMP_SUFFIX
        )
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and (
            e.filename is None
            or e.filename == tmp
            or str(e.filename).startswith(str(path.parent / f".{temp_stem(path.name)}."))
        ):
            e.filename, e.filename2 = str(path), None
        raise
    fsync_dir(path.parent)


def temp_stem(name: str) -> str:
    """`name` as a temp file's name holds it (.STEM.PID.random.tmp): its first TEMP_NAME_BYTES bytes,
    so that a legal 245-byte name does not make a temp name past the 255 bytes filesystems allow."""
    return os.fsdecode(os.fsencode(name)[:TEMP_NAME_BYTES])


def open_append(path: Path):
    """`path` opened to append text (created if missing), never through a symlink: a run directory
    may come from someone else, and a samples.txt linked to ~/.bashrc must not grow. OSError
    (ELOOP) for a symlink, which the command reports in one line; a write or flush that fails (a
    full disk) raises an OSError that names `path` (the file object's own name none)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666 & ~_UMASK)
    except OSError as e:
        if e.errno == errno.ELOOP and os.path.islink(path):  # O_NOFOLLOW's word for any symlink
            raise RunDirError(f"{path} is a symlink; craft-train appends to it - replace it with a file") from None
        raise
    return _NamedErrors(os.fdopen(fd, "a", encoding="utf-8"), str(path))


class _NamedErrors:
    """A text file whose write / flush / close OSErrors carry its path."""

    def __init__(self, file, path: str):
        self.file, self.path = file, path

    def _call(self, method, *args):
        try:
            return getattr(self.file, method)(*args)
        except OSError as e:
            e.filename = e.filename or self.path
            raise

    def write(self, text: str) -> int:
        return self._call("write", text)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sweep_temp_files(directory: Path, name: str = "") -> None:
    """Remove temp files of atomic writes (of `name`, or any) whose process is gone: a writer
    killed by SIGKILL or a power cut could not clean up. A live writer's temp file is left alone.
    Only names atomic_file makes (.STEM.PID.random.tmp, STEM exactly temp_stem(`name`) when given)
    are Craft's: a user's own .notes.tmp or .model.onnx.bak.tmp beside the output is not."""
    for path in Path(directory).iterdir():
        if not (path.name.startswith(f".{temp_stem(name)}") and path.name.endswith(TEMP_SUFFIX)):
            continue
        parts = path.name[1 : -len(TEMP_SUFFIX)].rsplit(".", 2)  # NAME, PID, random
        if len(parts) != 3 or (name and parts[0] != temp_stem(name)) or not (parts[1].isascii() and parts[1].isdigit()):
            continue
        if not _alive(int(parts[1])):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


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
    sweep_temp_files(run_dir)
    (Path(run_dir) / f".{CHECKPOINT}.link").unlink(missing_ok=True)


def check_out_dir(run_dir: Path) -> None:
    """Refuse an out_dir that cannot become a run directory before any work is done for it."""
    run_dir = Path(run_dir)
    try:
        str(run_dir).encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 (surrogates): TensorBoard's writer fails on them
        import importlib.util

        if importlib.util.find_spec("tensorboard") is not None:  # an optional extra: without it such a path works
            shown = os.fsencode(run_dir).decode("utf-8", "backslashreplace")
            raise RunDirError(
                f"out_dir={shown} is not UTF-8 text, which TensorBoard's writer needs; choose a UTF-8 out_dir=..."
            ) from None
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        what = "is a file" if existing == run_dir else f"is inside {existing}, which is a file"
        raise RunDirError(f"out_dir={run_dir} {what}, not a directory; choose another out_dir=...")
    if not os.access(existing, os.W_OK | os.X_OK):  # an OS condition, not bad input: exit 1, as craft-export's
        raise PermissionError(
            errno.EACCES, "cannot be written (permission denied or a read-only filesystem)", str(existing)
        )


class RunLock:
    """An exclusive flock on RUN_DIR/train.lock while one craft-train writes the run: a second
    one (two --resume at once) is refused with the holder's pid. The kernel drops the lock when
    the holder exits, however it exits; the file itself stays (removing it would race)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        self.created = False  # whether acquire() made the file and holds it (a refused new run removes it)

    def acquire(self) -> None:
        import fcntl

        if self.fd is not None:
            return
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC  # no symlink: the pid below would land in its target
        try:
            try:  # O_EXCL tells whether this process made the file (another may make it between a look and an open)
                fd, created = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666 & ~_UMASK), True
            except FileExistsError:
                fd, created = os.open(self.path, flags), False
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise RunDirError(
                f"{self.path} is a symlink; craft-train writes its pid there - remove it and run again"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunDirError(f"{self.path} is not a regular file; remove it and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent} is in use by another craft-train (pid {holder}); "
                f"wait for it to finish or stop it (kill {holder}), then run again"
            ) from None
        except OSError as e:
            if e.errno not in (
                errno.ENOLCK,
                errno.EOPNOTSUPP,
                errno.ENOSYS,
            ):  # a filesystem without locks: go on unlocked
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd, self.created = fd, created  # only a holder may ever remove the file it made

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


@contextmanager
def new_run(run_dir: Path, lock: RunLock | None = None) -> Iterator[Path]:
    """Create run_dir for a new run's first files (taking `lock` as soon as it exists); if the
    body raises (a corpus too short for the context, ...), remove what it made - the directories
    it created, or the files it added to one that was already there - so the corrected rerun is
    not refused. Refused the lock, it removes nothing: the directory is another run's."""
    run_dir = Path(run_dir)
    created = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    existed = set(run_dir.iterdir()) if created is None else set()
    run_dir.mkdir(parents=True, exist_ok=True)
    if lock is not None:
        lock.acquire()
    try:
        yield run_dir
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            made = set(run_dir.iterdir()) - existed
            if lock is not None and lock.created:
                made.add(lock.path)
            for path in made:
                path.unlink(missing_ok=True)
        raise


RUN_MARKERS = (CONFIG, DATA_INFO, TOKENS)  # files only craft-train writes


def is_run(run_dir: Path, lock: RunLock | None = None) -> bool:
    """Whether run_dir holds a craft-train run, not just files of the same names: one of
    RUN_MARKERS, or a train.lock that was there before `lock` (this process's) took it - a run
    killed while tokenizing leaves only its tokenizer and its lock."""
    if any((Path(run_dir) / name).is_file() for name in RUN_MARKERS):
        return True
    return (Path(run_dir) / LOCK).is_file() and not (lock is not None and lock.created)


def not_a_run(run_dir: Path, files: list[Path]) -> RunDirError:
    """The refusal for a directory that holds `files` of the names craft-train writes, but no run."""
    return RunDirError(
        f"{run_dir} holds {files[0].name}{' and more' if len(files) > 1 else ''} but is not a craft-train run "
        f"directory (no {', '.join(RUN_MARKERS)}): --overwrite would delete files that are not Craft's; "
        "choose another out_dir=..."
    )


def clear_run(run_dir: Path, lock: RunLock | None = None) -> None:
    """What a new run in an old run directory replaces (the token file is kept: prepare_tokens
    reuses it only when the corpus and tokenizer are unchanged). RunDirError (not_a_run) unless
    is_run: the *.pt or tokenizer.json of a directory craft-train did not make are someone else's."""
    stale = [path for path in run_files(run_dir) if path.name not in RUN_MARKERS]
    if stale and not is_run(run_dir, lock):  # nothing to delete (a new out_dir): nothing to refuse
        raise not_a_run(run_dir, stale)
    for path in stale:
        path.unlink(missing_ok=True)


def step_files(run_dir: Path) -> list[Path]:
    """The periodic checkpoints step-NNNNNN.pt, in no order (ASCII digits only: a step-².pt is not one)."""
    return [p for p in Path(run_dir).glob("step-*.pt") if (n := p.stem[len("step-") :]).isascii() and n.isdigit()]


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The checkpoints a run writes: checkpoint.pt, best.pt, step-NNNNNN.pt (not a user's model.pt)."""
    run_dir = Path(run_dir)
    return [path for path in (run_dir / CHECKPOINT, run_dir / BEST, *step_files(run_dir)) if os.path.lexists(path)]


def run_files(run_dir: Path) -> list[Path]:
    """The files in run_dir that a run writes (or replaces, or deletes): a new run there needs --overwrite."""
    run_dir = Path(run_dir)
    found = [*checkpoint_files(run_dir), *run_dir.glob(TENSORBOARD_GLOB)]
    found += [run_dir / name for name in (CHAR_TOKENIZER, SP_TOKENIZER, METRICS, SAMPLES, PLOT, *RUN_MARKERS)]
    return [path for path in found if os.path.lexists(path)]


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
        digits = text[start + len(prefix) :].split(" ", 1)[0]
        if digits.isascii() and digits.isdigit() and int(digits) > step:  # not '²': isdigit, not int
            cut = start
            break
        pos = text.find("\n" + prefix, start + 1)
    if cut is not None:
        atomic_write_bytes(path, text[:cut].encode("utf-8"))
