"""Import a GGUF file of the Llama family (general.architecture "llama"), read with the `gguf` package.

Tensors of type F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants (Q2_K..Q6_K) are
dequantized to float32 with the package's own routines (gguf.quants.dequantize); any other type
is refused with one line. Every tensor's name and shape is checked against the config from the
file's header before any tensor data is read.

llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) stores the rows of attn_q and
attn_k permuted for its interleaved RoPE: within each head, rows (0, 1, 2, ..., hd-1) of the
"rotate half" layout are written as (0, hd/2, 1, hd/2+1, ...). unpermute_rope_rows undoes it, so
the weights are back in the Hugging Face layout that craft.model uses.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

from craft.config import ModelConfig
from craft.export.sources import (
    GGUF,
    MAX_CONTEXT_LENGTH,
    Source,
    SourceError,
    check_config,
    check_finite,
    check_shapes,
    config_number,
    craft_names,
    file_sha256,
    gguf_field,
    regular_file,
)
from craft.runtime.artifact_check import RANGES

ARCHITECTURES = ("llama",)
# IQ4_NL: llama-quantize's fallback for Q2_K / Q3_K rows not a multiple of 256 wide (SmolLM2's 576)
SUPPORTED_TYPES = (
    *("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"),
    *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"),
)

# GGUF name (with {i} for the layer) -> Craft name (craft.model.Transformer's state_dict)
TENSOR_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
}


# Llama-3 rope scaling as llama.cpp's converter stores it: a divisor per RoPE frequency (rope_divisors)
ROPE_FREQS = "rope_freqs.weight"

# GGUF value type -> bytes per value (strings and arrays are variable: STRING, ARRAY)
GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_MAX_DIMS = 4  # ggml's own limit
GGUF_MAX_ENTRIES = 1 << 16  # metadata keys or tensors: real files have tens and a few thousand
GGUF_MAX_ITEMS = 1 << 24  # strings in one array: vocabularies and merge lists stay far below


def check_gguf_header(path: Path) -> None:
    """SourceError unless every length and count in the header (metadata and tensor infos, GGUF v2/v3)
    fits in the bytes that follow it. gguf.GGUFReader walks a claimed count past the end of the file
    (numpy returns empty arrays there), so a 70-byte file claiming an array of 2^40 values grew its
    lists until memory ran out; this walk stops at the first claim the file cannot hold."""
    import mmap

    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:
                raise GGUFHeaderError("shorter than a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                if data[:4] == b"GGUF":  # else the reader says what it is not
                    version = struct.unpack_from("<I", data, 4)[0]
                    if struct.unpack_from(">I", data, 4)[0] in (2, 3):  # gguf reads it too, past this walk
                        raise GGUFHeaderError("a big-endian GGUF, which Craft does not read")
                    if version not in (2, 3):
                        raise GGUFHeaderError(f"GGUF version {version}; Craft reads versions 2 and 3")
                    HeaderWalk(data).header()
    except GGUFHeaderError as e:
        raise SourceError(f"{path} is truncated or not a valid GGUF file ({e}); download or convert it again") from None
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror}") from None


class GGUFHeaderError(ValueError):
    """What check_gguf_header found wrong, for its one line."""


class HeaderWalk:
    """check_gguf_header's cursor over the mapped file: each read is checked against the bytes left."""

    def __init__(self, data):
        self.data, self.pos, self.end = data, 8, len(data)

    def number(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.pos + size > self.end:
            raise GGUFHeaderError(f"a field at byte {self.pos} runs past the end of the file")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def skip(self, size: int, what: str) -> None:
        if size > self.end - self.pos:
            raise GGUFHeaderError(f"{what} at byte {self.pos} claims {size:,} bytes, more than the file holds")
        self.pos += size

    def value(self, kind: int, nested: bool = False) -> None:
        if kind in GGUF_SCALAR_BYTES:
            self.skip(GGUF_SCALAR_BYTES[kind], "a value")
        elif kind == GGUF_STRING:
            self.skip(self.number("<Q"), "a string")
        elif kind == GGUF_ARRAY and not nested:
            item, count = self.number("<I"), self.number("<Q")
            if item in GGUF_SCALAR_BYTES:
                self.skip(count * GGUF_SCALAR_BYTES[item], "an array")
            elif count > min((self.end - self.pos) // 8, GGUF_MAX_ITEMS):  # a string takes 8 bytes or more
                raise GGUFHeaderError(f"an array at byte {self.pos} claims {count:,} items, more than the file holds")
            else:
                for _ in range(count):
                    self.value(item, nested=True)
        else:
            raise GGUFHeaderError(f"value type {kind} at byte {self.pos}")

    def header(self) -> None:
        tensors, fields = self.number("<Q"), self.number("<Q")
        if max(tensors, fields) > GGUF_MAX_ENTRIES:  # each is walked in Python: bounded before the walk
            raise GGUFHeaderError(f"it claims {fields:,} metadata keys and {tensors:,} tensors")
        for _ in range(fields):
            self.skip(self.number("<Q"), "a key")
            self.value(self.number("<I"))
        for _ in range(tensors):
            self.skip(self.number("<Q"), "a tensor name")
            dims = self.number("<I")
            if dims > GGUF_MAX_DIMS:
                raise GGUFHeaderError(f"a tensor at byte {self.pos} claims {dims} dimensions (at most {GGUF_MAX_DIMS})")
            self.skip(8 * dims + 4 + 8, "a tensor's shape, type and offset")


def load_gguf(path: Path) -> Source:
    """The model in a GGUF file as a Source; SourceError (one line) if unusable."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    if not regular_file(path, "a GGUF file (--from gguf)"):  # before the reader opens it: a FIFO blocks it
        raise SourceError(f"{path} does not exist; give the path of a .gguf file")
    check_gguf_header(path)
    try:
        with np.errstate(over="ignore"):  # an offset near 2**64 wraps in the reader's uint64 sum: check_offsets says so
            reader = GGUFReader(path)
    except (
        ValueError,
        IndexError,
        KeyError,
        TypeError,
        OSError,
    ) as e:  # the reader's way of saying "short or bad bytes"
        raise SourceError(f"{path} is truncated or not a valid GGUF file ({e}); download or convert it again") from None
    check_offsets(reader, path)
    fields = {
        name: gguf_field(field, name, path)
        for name, field in reader.fields.items()
        if not name.startswith("tokenizer.")
    }
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = tensors.pop(ROPE_FREQS, None)
    architecture, cfg = model_config(fields, tensors, path)
    names = craft_names(tensors, TENSOR_NAMES, str(path))
    shapes = {
        c: tuple(int(d) for d in reversed(tensors[g].shape.tolist())) for c, g in names.items()
    }  # GGUF lists dims fastest first
    check_shapes(cfg, shapes, str(path), TENSOR_NAMES, f"{architecture}.block_count")
    for name in names.values():
        kind = tensors[name].tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise SourceError(
                f"{path}: tensor {name} has type {kind}; Craft imports {', '.join(SUPPORTED_TYPES)} - "
                f"convert the model to one of those (e.g. Q8_0 or Q4_K_M)"
            )
    state = {}
    for craft, name in names.items():
        t = tensors[name]
        with np.errstate(over="ignore", invalid="ignore"):  # an inf / NaN block scale: check_finite names the tensor
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shapes[craft])
        if name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, cfg.n_head)
        elif name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, cfg.kv_heads)
        state[craft] = torch.from_numpy(np.require(w, requirements=["C", "W"]))  # copies only a read-only mapping
    check_finite(state, str(path), TENSOR_NAMES)
    divisors = None if rope_freqs is None else rope_divisors(rope_freqs, cfg, path)
    return Source(GGUF, path, architecture, cfg, state, file_sha256([path]), reader, divisors)


def rope_divisors(tensor, cfg: ModelConfig, path: Path) -> torch.Tensor:
    """A GGUF's rope_freqs.weight: one factor per RoPE frequency (head_dim / 2 of them), each
    frequency divided by its own, as llama.cpp's rope does. llama.cpp's converter writes it for
    Llama-3.1 / 3.2 in place of the rope_scaling its config.json had; SourceError unless it is
    that many finite positive numbers."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in tensor.shape.tolist())
    kind = tensor.tensor_type.name
    if shape != (cfg.head_dim // 2,) or kind not in ("F32", "F16", "BF16"):
        raise SourceError(
            f"{path}: tensor {ROPE_FREQS} is {kind} {shape}, expected F32, F16 or BF16 ({cfg.head_dim // 2},) - one "
            "factor per RoPE frequency; the file is corrupt - download or convert it again"
        )
    factors = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).reshape(shape)
    if not (np.isfinite(factors).all() and (factors > 0).all()):
        raise SourceError(
            f"{path}: tensor {ROPE_FREQS} holds {factors[~(np.isfinite(factors) & (factors > 0))][0]}, expected "
            "finite factors above 0; the file is corrupt - download or convert it again"
        )
    return torch.from_numpy(factors)


def check_offsets(reader, path: Path) -> None:
    """SourceError unless every tensor's data starts inside the data section at a multiple of the file's
    alignment, and no two tensors share bytes (a writer never does any of these; the reader checks
    none: an offset of 2**64 - 32 wraps to 32 bytes before the section and reads the header)."""
    spans = []
    for t in reader.tensors:
        offset = int(t.data_offset) - int(reader.data_offset)
        if offset < 0:  # one past the file's end the reader refuses itself (its data reshapes short)
            raise SourceError(
                f"{path}: tensor {t.name[:100]} starts at data offset {offset}, before the data section; "
                "the file is corrupt - download or convert it again"
            )
        if offset % reader.alignment:
            raise SourceError(
                f"{path}: tensor {t.name[:100]} starts at data offset {offset}, expected a multiple of the "
                f"file's alignment {reader.alignment}; the file is corrupt - download or convert it again"
            )
        spans.append((offset, offset + int(t.n_bytes), t.name))
    spans.sort()
    for (_, previous_end, previous), (begin, _, name) in zip(spans, spans[1:]):
        if begin < previous_end:  # two tensors sharing bytes
            raise SourceError(
                f"{path}: tensors {previous[:100]} and {name[:100]} overlap (data bytes {begin} to {previous_end}); "
                "the file is corrupt - download or convert it again"
            )


def model_config(fields: dict, tensors: dict, where: Path) -> tuple[str, ModelConfig]:
    """(architecture, Craft ModelConfig) from the GGUF metadata; SourceError naming what is unsupported."""
    architecture = fields.get("general.architecture", "unknown")
    if architecture not in ARCHITECTURES:
        raise SourceError(
            f"{where}: GGUF architecture '{architecture}' is not supported; Craft imports {', '.join(ARCHITECTURES)} "
            f"(or the Hugging Face directory of LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
        )

    def get(key: str, kind: type[int] | type[float], lo: float, hi: float = math.inf, default=None, **bounds):
        value = fields.get(f"{architecture}.{key}", default)
        if value is None:
            raise SourceError(
                f"{where} lacks a number for '{architecture}.{key}', which a {architecture} GGUF must have"
            )
        return config_number(value, f"{architecture}.{key}", where, kind, lo, hi, **bounds)

    def size(key: str, field: str, default=None) -> int:
        """An integer field within the range craft-run accepts for the ModelSpec field it becomes."""
        return get(key, int, *RANGES[field], default=default)

    split = fields.get("split.count")
    if isinstance(split, int) and split > 1:  # the first part holds the metadata and some of the tensors
        raise SourceError(
            f"{where} is part of a split GGUF ({split} files); merge them first: "
            "llama-gguf-split --merge FIRST OUT.gguf"
        )
    experts = fields.get(f"{architecture}.expert_count")
    if isinstance(experts, int) and experts > 0:
        raise SourceError(
            f"{where} is a mixture-of-experts model ({experts} experts, as Mixtral); Craft imports dense models only"
        )
    scaling = fields.get(f"{architecture}.rope.scaling.type", "none")
    if scaling != "none":
        raise SourceError(
            f"{where}: rope scaling '{scaling}' is not supported for GGUF; export the Hugging Face directory instead"
        )
    for key in ("rope.scaling.factor", "rope.scale_linear"):  # llama.cpp scales linearly by it, type or not
        factor = fields.get(f"{architecture}.{key}")
        if factor is not None and factor not in (0, 1):
            raise SourceError(
                f"{where}: rope scaling ({architecture}.{key} = {factor!s:.20}) is not supported for GGUF; "
                "export the Hugging Face directory instead"
            )
    if "token_embd.weight" not in tensors:
        raise SourceError(f"{where} lacks tensor token_embd.weight; the file is incomplete")
    dim, n_head = size("embedding_length", "dim"), size("attention.head_count", "n_head")
    head_dim = size("attention.key_length", "head_dim", default=dim // n_head)
    rotary = size("rope.dimension_count", "head_dim", default=head_dim)
    if rotary != head_dim or size("attention.value_length", "head_dim", default=head_dim) != head_dim:
        raise SourceError(
            f"{where}: partial rotary ({rotary} of {head_dim}) or different key/value widths are not supported"
        )
    embedding = tuple(int(d) for d in tensors["token_embd.weight"].shape.tolist())
    if len(embedding) != 2:
        raise SourceError(f"{where}: tensor token_embd.weight has shape {embedding}, expected 2 dims (dim, vocab)")
    vocab = embedding[1]  # the embedding's rows: (dim, vocab) in GGUF's order
    cfg = ModelConfig(
        vocab_size=vocab,
        dim=dim,
        n_layer=size("block_count", "n_layer"),
        n_head=n_head,
        n_kv_head=size("attention.head_count_kv", "n_kv_head", default=n_head),
        ffn_dim=size("feed_forward_length", "hidden_dim"),
        context_length=get("context_length", int, 1, MAX_CONTEXT_LENGTH),
        rope_theta=get("rope.freq_base", float, 0, default=10000.0, above=True),
        norm_eps=get("attention.layer_norm_rms_epsilon", float, 0, 1, default=1e-5, below=True),
        tie_embeddings="output.weight" not in tensors,
        dropout=0.0,
        head_size=head_dim if head_dim * n_head != dim else 0,
    )
    check_config(cfg, where)
    return architecture, cfg


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of q/k rows, (n_head * hd, ...) "rotate half" -> interleaved pairs
    (convert_hf_to_gguf.py's LlamaModel.permute). Only tests use it: they write GGUF files with it."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_rope_rows: interleaved pairs back to "rotate half" (as transformers'
    GGUF loader does). unpermute_rope_rows(permute_rope_rows(w, h), h) == w exactly."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
