"""Where a model comes from: a Craft run directory, a Hugging Face model directory or a GGUF file.

    detect_kind(path)         "run" | "hf" | "gguf", from what the path is (--from forces it)
    load_source(path, kind)   an imported model (hf, gguf) as a Source: Craft's ModelConfig and a
                              state_dict for craft.model.Transformer, checked against each other

A run directory is read by craft.export.exporter.load_run (it has a tokenizer and val tokens of
its own). The readers of the other two live in source_hf.py and source_gguf.py; both check every
tensor's name and shape against the config before reading any tensor data, so a checkpoint that
disagrees with its config, or a truncated file, is one line (SourceError), not an allocation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from craft.config import ModelConfig
from craft.model import Transformer

RUN, HF, GGUF = "run", "hf", "gguf"
KINDS = (RUN, HF, GGUF)
GGUF_MAGIC = b"GGUF"


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

    def model(self) -> Transformer:
        return Transformer.from_state_dict(self.config, self.state_dict)


def detect_kind(path: Path) -> str:
    """GGUF for a file that starts with the GGUF magic, HF for a directory with config.json and no
    config.yaml, RUN otherwise (so that load_run explains what a run directory lacks); SourceError
    for a file that is not GGUF and for a missing .gguf path."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return GGUF
        raise SourceError(
            f"{path} is not a GGUF file (no GGUF magic); craft-export takes a run directory, "
            f"a Hugging Face model directory or a .gguf file"
        )
    if path.suffix == ".gguf" and not path.exists():
        raise SourceError(f"{path} does not exist; give the path of a .gguf file")
    if path.is_dir() and (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        return HF
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
        model = Transformer(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        del shapes["output.weight"]
    return shapes


def check_shapes(
    cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str, source_names: dict[str, str]
) -> None:
    """SourceError unless `shapes` (Craft name -> shape, from the file's header) is exactly what
    `cfg` needs. `source_names` (the source's name table, as rename takes it) names tensors in
    the message as the source does."""
    back = {craft: name for name, craft in source_names.items()}
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in shapes:
            raise SourceError(
                f"{source} lacks tensor {rename(name, back)} that its config implies; "
                f"the checkpoint is incomplete or its config describes another model"
            )
        if tuple(shapes[name]) != shape:
            raise SourceError(
                f"{source}: tensor {rename(name, back)} has shape {list(shapes[name])}, its config "
                f"implies {list(shape)}; the checkpoint and its config describe different models"
            )
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise SourceError(
            f"{source} has tensor {rename(extra[0], back)} that its config does not call for "
            f"({len(extra)} such); the config describes another model, or one Craft does not import"
        )


def rename(name: str, table: dict[str, str]) -> str:
    """`name` through `table`, whose keys and values have {i} where a layer index stands
    ("blk.{i}.attn_q.weight" -> "layers.{i}.attention.wq.weight"); unchanged when none matches."""
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            template = ".".join(parts[:k] + ["{i}"] + parts[k + 1 :])
            if template in table:
                return table[template].format(i=part)
    return table.get(name, name)


def file_sha256(paths: list[Path]) -> str:
    """SHA-256 over the files' bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
