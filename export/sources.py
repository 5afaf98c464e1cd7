"""Where a model comes from: a Craft run directory, a Hugging Face model directory or a GGUF file.

    detect_kind(path)         "run" | "hf" | "gguf", from what the path is (--from forces it)
    load_source(path, kind)   an imported model (hf, gguf) as a Source: Craft's ModelConfig and a
                              state_dict for craft.model.Transformer, checked against each other

A run directory is read by craft.export.exporter.load_run (it has a tokenizer and val tokens of
its own). The readers of the other two live in source_hf.py and source_gguf.py; both check every
tensor's name and shape against the config before reading any tensor data, so a checkpoint that
disagrees with its config, or a truncated file, is one line (SourceError), not an allocation.

Every number a source's config claims goes through config_number (type, finiteness, range, the
key named in the message) where it is read, and check_config holds the fields against each other;
check_shapes then holds the config against the tensors present. Only then is anything sized from
the config. Every file a source reads is first checked to be a regular file (regular_file): a
FIFO would block the read forever, a device would never end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch

from craft.config import ModelConfig
from craft.model import Transformer, build_model
from craft.run_dir import read_small
from craft.runtime.artifact_check import RANGES

RUN, HF, GGUF = "run", "hf", "gguf"
KINDS = (RUN, HF, GGUF)
GGUF_MAGIC = b"GGUF"

# The longest context a source may declare. The export stores RoPE tables of context x head_dim
# float32 (cos and sin) in the file and builds them in float64 first, so the context is what sizes
# them: 2**20 positions is past every model Craft imports (Llama 3.1: 131,072; Qwen2.5-1M: 1,010,000)
# and keeps a 128-wide head's tables at 1 GiB, inside ONNX's 2 GiB protobuf. craft-run accepts more
# (craft.runtime.artifact_check.RANGES), so nothing exported here is refused there for its context.
MAX_CONTEXT_LENGTH = 1 << 20
MAX_ROPE_ENTRIES = MAX_CONTEXT_LENGTH * 128  # context x head_dim: the tables' size, however it is split


class SourceError(ValueError):
    """A source that cannot be imported; the message is one line saying what and the fix."""


@dataclass
class Source:
    """An imported model: what craft.model.Transformer needs, and where it came from."""

    kind: str  # HF or GGUF
    path: Path
    architecture: str  # as the source names it: "LlamaForCausalLM", "llama", ...
    config: ModelConfig
    state_dict: dict[str, torch.Tensor] = field(repr=False)  # Craft names, float32
    sha256: str  # of the weight files (and config.json): the artifact's source hash
    gguf_reader: object | None = field(default=None, repr=False)  # a GGUF source's open gguf.GGUFReader: its
    # tokenizer is read from the same parse (reading a 49k-token vocabulary's metadata takes seconds)
    rope_divisors: torch.Tensor | None = None  # (head_dim / 2,) a GGUF's rope_freqs.weight (craft.model.rope_tables)

    def model(self) -> Transformer:
        return Transformer.from_state_dict(self.config, self.state_dict, self.rope_divisors)


def file_mode(path: Path) -> int | None:
    """st_mode of `path` (symlinks followed), None where nothing is there; SourceError if it cannot be stat'ed."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as e:  # a null byte or a lone surrogate in the name: no file can have it
        what = "is not valid text (a lone surrogate)" if isinstance(e, UnicodeError) else "contains a null byte"
        raise SourceError(f"{str(path)[:200]!r} {what}; no file is named so - correct the name") from None
    except OSError as e:
        raise SourceError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None


def gguf_field(field: object, key: str, path: object) -> object:
    """The value of GGUF metadata field `key` of the file at `path` (a gguf ReaderField); SourceError
    naming the file and the key where its text is not UTF-8 (the reader decodes only when asked)."""
    try:
        return field.contents()
    except UnicodeDecodeError as e:
        raise SourceError(
            f"{path}: metadata field {key[:100]} holds text that is not UTF-8 ({e.reason} at byte {e.start}); "
            "the file is corrupt - download or convert it again"
        ) from None


def describe_mode(mode: int) -> str:
    """What a file is, in words: 'a FIFO', 'a directory', 'a regular file', ..."""
    for test, what in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a regular file"  # a file type no stat test above names


def regular_file(path: Path, expected: str = "a regular file; replace it with the file itself") -> bool:
    """True for a regular file (symlinks followed), False where nothing is at `path`; SourceError saying
    what was `expected` for anything else, before it is opened: reading a FIFO blocks forever, a
    device never ends."""
    mode = file_mode(path)
    if mode is None:
        return False
    if not stat.S_ISREG(mode):
        raise SourceError(f"{path} is {describe_mode(mode)}, expected {expected}")
    return True


def read_json(path: Path, what: str) -> object:
    """The JSON value in the regular file `path` (`what` it should be, for the message); SourceError
    for a missing, non-regular, unreadable or malformed file, JSON nested past the stack included."""
    if not regular_file(path):
        raise SourceError(f"{path} does not exist; it must be {what}")
    try:
        raw = read_small(path)
    except OSError as e:
        raise SourceError(f"cannot read {path} ({e.strerror}); it must be {what}") from None
    return parse_json(raw, path, f"it must be {what}")


def parse_json(raw: bytes, path: Path, fix: str) -> object:
    """The JSON value in `raw` (the bytes of `path`); SourceError ending in `fix` if they are not
    JSON, JSON nested past the stack included."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; RecursionError: [[[[...
        message = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:200]
        raise SourceError(f"{path} is not readable JSON ({message}); {fix}") from None


def config_number(
    value: object,
    key: str,
    where: object,
    kind: type[int] | type[float],
    lo: float,
    hi: float = math.inf,
    *,
    above: bool = False,
    below: bool = False,
) -> int | float:
    """`value`, config key `key` of `where`, checked before anything is sized from it: a number of
    `kind` (an int for int; an int or float for float; never a bool), finite, and in lo..hi (`above`:
    strictly above lo; `below`: strictly below hi). SourceError naming the key, the value and the range."""
    is_number = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
    if is_number and kind is float:
        try:
            value = float(value)
        except OverflowError:  # an int past float's range: out of range as any number is
            is_number = False
    ok = (
        is_number
        and math.isfinite(value)
        and (lo < value if above else lo <= value)
        and (value < hi if below else value <= hi)
    )
    if not ok:
        lower = f"> {lo}" if above else f">= {lo}"
        upper = "" if hi == math.inf else f" and {'<' if below else '<='} {hi}"
        got = json.dumps(value) if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
        got = got if len(got) <= 60 else f"{got[:40]}... ({len(got)} characters)"
        raise SourceError(
            f"{where}: '{key}' is {got}, expected {'an integer' if kind is int else 'a number'} {lower}{upper}; "
            "correct it (the file is damaged or describes a model Craft cannot run)"
        )
    return value


def check_config(cfg: ModelConfig, where: object) -> None:
    """The config's fields against each other and against what craft-run accepts (the fields themselves
    were checked as read, by config_number); SourceError otherwise."""
    for name in ("vocab_size", "dim", "n_layer", "n_head", "head_dim", "hidden_dim"):
        lo, hi = RANGES[name]
        if not lo <= getattr(cfg, name) <= hi:
            raise SourceError(f"{where}: {name} is {getattr(cfg, name)}, expected {lo}..{hi}; Craft cannot run it")
    if not 1 <= cfg.kv_heads <= cfg.n_head or cfg.n_head % cfg.kv_heads or cfg.head_dim % 2:
        raise SourceError(
            f"{where}: {cfg.n_head} heads, {cfg.kv_heads} key-value heads of width {cfg.head_dim}: "
            f"heads must be a multiple of key-value heads and the width even"
        )
    if cfg.context_length * cfg.head_dim > MAX_ROPE_ENTRIES:
        raise SourceError(
            f"{where}: context {cfg.context_length} x head width {cfg.head_dim} needs RoPE tables of "
            f"{cfg.context_length * cfg.head_dim:,} entries, more than Craft's {MAX_ROPE_ENTRIES:,}; "
            "lower the context length in the config"
        )


def detect_kind(path: Path) -> str:
    """GGUF for a file that starts with the GGUF magic, HF for a directory with config.json and no
    config.yaml, RUN otherwise (so that load_run explains what a run directory lacks); SourceError
    for a file that is not GGUF, for a missing .gguf path and for anything neither a regular file
    nor a directory (a FIFO, a device: reading it would block or never end)."""
    path = Path(path)
    mode = file_mode(path)
    if mode is None:
        if path.suffix == ".gguf":
            raise SourceError(f"{path} does not exist; give the path of a .gguf file")
        return RUN
    if stat.S_ISREG(mode):
        with open(path, "rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return GGUF
        raise SourceError(
            f"{path} is not a GGUF file (no GGUF magic); craft-export takes a run directory, "
            f"a Hugging Face model directory or a .gguf file"
        )
    if not stat.S_ISDIR(mode):
        raise SourceError(
            f"{path} is {describe_mode(mode)}, neither a file nor a directory; craft-export takes a run "
            f"directory, a Hugging Face model directory or a .gguf file"
        )
    if file_mode(path / "config.json") is not None and file_mode(path / "config.yaml") is None:
        return HF  # config.json of any kind: load_hf says what is wrong with it
    return RUN


def load_source(path: Path, kind: str | None = None) -> Source:
    """The imported model at `path` (kind HF or GGUF; detected when None)."""
    kind = kind or detect_kind(path)
    if kind == HF:
        from craft.export.source_hf import load_hf

        return load_hf(Path(path))
    if kind == GGUF:
        from craft.export.source_gguf import load_gguf

        return load_gguf(Path(path))
    raise SourceError(f"load_source reads '{HF}' or '{GGUF}' sources, got '{kind}'")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a source must provide for `cfg` (a tied head is not one)."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = build_model(cfg)  # a run's may be recurrent
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        del shapes["output.weight"]
    return shapes


def check_shapes(
    cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str, source_names: dict[str, str], layers_key: str
) -> None:
    """SourceError unless `shapes` (Craft name -> shape, from the file's header) is exactly what
    `cfg` needs. `source_names` (the source's name table, as rename takes it) names tensors in
    the message as the source does; `layers_key` is the config key that gives the layer count."""
    back = {craft: name for name, craft in source_names.items()}
    # The layer count first, from the names alone: expected_shapes builds a (meta) model of cfg.n_layer
    # blocks, which for a claim of a million layers takes minutes and GBs that the file never paid for.
    parts = (name.split(".")[1] for name in shapes if name.startswith("layers."))
    layers = {int(part) for part in parts if part.isascii() and part.isdigit()}
    if cfg.n_layer > len(layers):
        missing = next(i for i in range(cfg.n_layer) if i not in layers)  # at most len(layers) + 1 steps
        first = "recurrence_norm" if cfg.arch == "recurrent" else "attention_norm"  # the layer's first tensor
        raise SourceError(
            f"{source} lacks layer {missing} ({rename(f'layers.{missing}.{first}.weight', back)}, ...): "
            f"its config claims {cfg.n_layer} layers ({layers_key}), its weights hold {len(layers)}; "
            "the checkpoint is incomplete or its config describes another model"
        )
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in shapes:
            raise SourceError(
                f"{source} lacks tensor {rename(name, back)} that its config implies; "
                f"the checkpoint is incomplete or its config describes another model"
            )
        if tuple(shapes[name]) != shape:
            shown = str(list(shapes[name]))
            shown = shown if len(shown) <= 80 else f"{shown[:60]}... ({len(shapes[name]):,} dims)"  # one short line
            raise SourceError(
                f"{source}: tensor {rename(name, back)} has shape {shown}, its config "
                f"implies {list(shape)}; the checkpoint and its config describe different models"
            )
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise SourceError(
            f"{source} has tensor {rename(extra[0], back)} that its config does not call for "
            f"({len(extra)} such); the config describes another model, or one Craft does not import"
        )


def check_finite(state: dict[str, torch.Tensor], source: str, source_names: dict[str, str]) -> None:
    """SourceError naming the first tensor of `state` (Craft names) that holds NaN or an infinity: a
    damaged checkpoint is bad input, not a model that fails verification after minutes of export."""
    back = {craft: name for name, craft in source_names.items()}
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise SourceError(
                f"{source}: tensor {rename(name, back)} holds NaN or infinite values; the checkpoint is damaged"
            )


def rename(name: str, table: dict[str, str]) -> str:
    """`name` through `table`, whose keys and values have {i} where a layer index stands
    ("blk.{i}.attn_q.weight" -> "layers.{i}.attention.wq.weight"); unchanged when none matches."""
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isascii() and part.isdigit():  # '²' is a digit to isdigit, not to int
            template = ".".join(parts[:k] + ["{i}"] + parts[k + 1 :])
            if template in table:
                return table[template].format(i=part)
    return table.get(name, name)


def craft_names(names, table: dict[str, str], where: str) -> dict[str, str]:
    """Craft name -> the source's name, for each of `names` through rename; SourceError where two of
    them become one Craft name (a tensor named "norm.weight" beside "model.norm.weight"): the last
    one read replaced the other, and the export computed another model than transformers loads."""
    out: dict[str, str] = {}
    for name in names:
        craft = rename(name, table)
        if craft in out:
            raise SourceError(
                f"{where} has both {out[craft][:100]!r} and {name[:100]!r}, which are one tensor ({craft[:100]}) "
                "to Craft; the file is damaged or not a model of its architecture"
            )
        out[craft] = name
    return out


def file_sha256(paths: list[Path]) -> str:
    """SHA-256 over the files' bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
