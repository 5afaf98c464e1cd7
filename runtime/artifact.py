"""The Craft .onnx artifact contract: I/O names and metadata keys. Defined only here.

craft.export writes files that satisfy this; craft.runtime (both backends) reads them. They
meet at this file and nowhere else.

Graph inputs    input_ids int64 (B, T); attention_mask int64 (B, P + T); position_ids int64 (B, T);
                past_key_values.{i}.key / .value float32 (B, n_kv_heads, P, head_dim);
                logits_to_keep int64 (1,) from format version 3 on: a count, as transformers'
                integer logits_to_keep (not its tensor of indices); its default (an initializer
                of that name) is [0]
Graph outputs   logits float32 (B, K, vocab): the last K = logits_to_keep positions, all T for
                0 or K > T; present.{i}.key / .value (B, n_kv_heads, P + T, head_dim)
                (Hugging Face / Optimum names, so third-party runtimes can drive the file too; one
                that does not feed logits_to_keep gets every position's logits. ONNX Runtime
                warns at load that the initializer is overridable: that is what it is for.)
Recurrent files (ModelSpec.arch "recurrent"): past_state.{i} float32 (B, dim) in, present_state.{i}
                (B, dim) out, in place of the key/value pairs: a fixed size whatever P is. The last T
                columns of attention_mask gate the state (a pad leaves it untouched); position_ids
                is accepted and unused, so one loop drives both kinds.

Weights (graph initializers): their names, shapes and each quantization scheme's stored
layout are the other half of the contract, in craft.runtime.weights.
"""

from __future__ import annotations

import base64
import json
from dataclasses import MISSING, dataclass, fields

# 2: the model config may say head_rotation, a weight an older (version 1) runtime would not
# apply - it refuses the file instead of computing wrong logits.
# 3: the graph has the logits_to_keep input (a prefill computes the head for its last position
# alone).
# 4: the model config may say ffn_rotation, a weight a version 3 runtime would not apply.
# craft-export writes the oldest version that holds the file (oldest_version): 4 for an imported
# int8 / int4 file, 3 for the rest, which version 3 runtimes still run. This runtime reads 1 to 4.
FORMAT_VERSION = 4
HEAD_ROTATION_VERSION = 2  # the first version whose model config may say head_rotation
FFN_ROTATION_VERSION = 4  # the first version whose model config may say ffn_rotation
LOGITS_TO_KEEP_VERSION = 3  # the first version whose graph has LOGITS_TO_KEEP
DOMAIN = "ai.craft"  # ModelProto.domain of every Craft file

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
LOGITS_TO_KEEP = "logits_to_keep"  # Hugging Face's name for the same argument


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


LLAMA, RECURRENT = "llama", "recurrent"  # ModelSpec.arch: craft.config.ARCHS


def past_state_name(layer: int) -> str:
    return f"past_state.{layer}"


def present_state_name(layer: int) -> str:
    return f"present_state.{layer}"


def empty_past(spec: "ModelSpec", batch: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every past input before the first token: an empty KV-cache (P = 0), or a
    recurrent file's zero state. Feed zeros of these shapes for a prefill."""
    if spec.arch == RECURRENT:
        return {past_state_name(i): (batch, spec.dim) for i in range(spec.n_layer)}
    return {name: (batch, spec.n_kv_head, 0, spec.head_dim) for i in range(spec.n_layer) for name in past_names(i)}


def present_outputs(spec: "ModelSpec") -> list[str]:
    """The outputs after logits, in the order of empty_past's inputs: this step's past for the next."""
    if spec.arch == RECURRENT:
        return [present_state_name(i) for i in range(spec.n_layer)]
    return [name for i in range(spec.n_layer) for name in present_names(i)]


def position_ids(attention_mask):
    """position_ids for every column of an attention_mask (B, S) numpy array: a left-padded row's
    first real token is position 0 (padding gets 0 too; it is masked out). Slice the last T
    columns for a step. (numpy is imported here: the rest of this file is standard library only.)"""
    import numpy as np

    return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)


# metadata_props keys
META_FORMAT = "craft.format_version"
META_VERSION = "craft.version"
META_CONFIG = "craft.model_config"  # JSON of ModelSpec
META_TOKENIZER_KIND = (
    "craft.tokenizer.kind"  # "sentencepiece" | "char" | "tokenizer.json" (craft.runtime.tokenizer.KINDS)
)
META_TOKENIZER = "craft.tokenizer.data"  # base64 of the tokenizer's to_bytes()
META_BOS, META_EOS, META_PAD = "craft.bos_id", "craft.eos_id", "craft.pad_id"
META_QUANT = "craft.quantization"  # a scheme name: a key of craft.runtime.weights.SCHEMES
# SHA-256 of the source's weights: a craft-train checkpoint's header hash (of its payload), a GGUF file's,
# a Hugging Face directory's over config.json then the weight files, concatenated in that order
META_CHECKPOINT = "craft.checkpoint_sha256"
META_EXPORT_REPORT = "craft.export_report"  # JSON of the verification figures at export
# Optional (absent from files of craft-trained models and from older files; FORMAT_VERSION unchanged):
META_CHAT_TEMPLATE = "craft.chat_template"  # the source's Jinja chat template, rendered by craft.runtime.chat_template
META_EOT_IDS = "craft.end_of_turn_ids"  # JSON list of every id that ends a reply (EOS, end-of-turn, ...)
META_SOURCE_KIND = "craft.source.kind"  # "hf" | "gguf" for an imported model; absent: a craft-train run
META_ATTENTION = "craft.attention"  # one of ATTENTIONS; absent means ATTENTION_STANDARD

# How the graph keeps its KV-cache (META_ATTENTION):
# standard  standard ONNX ops; past (B, kv, P, hd) in, present (B, kv, P + T, hd) out (a Concat):
#           any ONNX runtime can drive it with plain session.run().
# inplace   com.microsoft GroupQueryAttention (onnxruntime >= ORT_INPLACE_MIN); past and present are
#           the same (B, kv, context_length, hd) buffer, bound as both input and output, written in
#           place at each row's length = its attention_mask sum (tokens packed at the start of the
#           buffer); position_ids is accepted but unused. Fed plain growing arrays instead, it
#           behaves like `standard` (present = past + new), so session.run() still works.
ATTENTION_STANDARD, ATTENTION_INPLACE = "standard", "inplace"
ATTENTIONS = (ATTENTION_STANDARD, ATTENTION_INPLACE)
ORT_INPLACE_MIN = "1.20"
INPLACE_HEAD_MULTIPLE = 16  # ONNX Runtime's CPU GroupQueryAttention takes head widths that are multiples of this

# The operators a Craft graph is made of (domain, op_type; "" is ai.onnx), every scheme, attention and
# architecture, Scan's body included; a file with any other is refused before ONNX Runtime runs it. The graph
# is code that ONNX Runtime executes: a Loop of 10^15 iterations or an If reading data from beside the file
# passes every check on names, shapes and weights. Mod and Pad: in graphs of earlier Craft versions.
GRAPH_OPS = frozenset(
    [("", op) for op in (
        "Add", "And", "Cast", "Concat", "Div", "Gather", "Gemm", "Identity", "LessOrEqual", "MatMul", "Mod",
        "Mul", "Neg", "Pad", "Pow", "Range", "ReduceMean", "ReduceSum", "Reshape", "Scan", "Shape", "Sigmoid",
        "Slice", "Softmax", "Split", "Sqrt", "Sub", "Transpose", "Unsqueeze", "Where",
    )]
    + [("com.microsoft", op) for op in (
        "GatherBlockQuantized", "GroupQueryAttention", "MatMulNBits", "SkipSimplifiedLayerNormalization",
    )]
)  # fmt: skip


class ArtifactError(ValueError):
    """A file that is not a usable Craft model; one line saying what is wrong and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """What a runtime needs to know about the network (a subset of craft.config.ModelConfig)."""

    vocab_size: int
    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    hidden_dim: int
    context_length: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    # Fields added later have defaults, so files written before them still read:
    qkv_bias: bool = False  # the file has layers.{i}.attention.wqkv.bias (imported Qwen2 models)
    arch: str = LLAMA  # LLAMA or RECURRENT (craft/recurrent.py: state I/O in place of the KV-cache)
    head_rotation: bool = False  # the file has head_rotation: a rotated residual stream (export/rotation.py)
    ffn_rotation: bool = False  # the file has ffn_rotation: w2's input turned per block (export/rotation.py)

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        """Parse and type-check (ints are ints, never bools); ranges are craft.runtime.artifact_check's."""
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ArtifactError(
                f"model config in the file is a JSON {type(values).__name__}, not an object; "
                "re-export it with craft-export"
            )
        missing = {f.name for f in fields(cls) if f.default is MISSING} - values.keys()
        if missing:
            raise ArtifactError(
                f"model config in the file lacks {sorted(missing)}; re-export it with this craft version"
            )
        typed = {}
        for f in fields(cls):
            if f.name not in values:  # a field added later: its default
                continue
            value = values[f.name]
            kind = {"int": int, "float": (int, float), "bool": bool, "str": str}[f.type]
            if not isinstance(value, kind) or (f.type != "bool" and isinstance(value, bool)):
                raise ArtifactError(
                    f"model config in the file has {f.name}={json.dumps(value)[:40]}, expected {f.type}; "
                    f"re-export it with craft-export"
                )
            typed[f.name] = float(value) if f.type == "float" else value
        if typed.get("arch", LLAMA) not in (LLAMA, RECURRENT):
            raise ArtifactError(
                f"model config names architecture {json.dumps(typed['arch'])[:40]}, this runtime runs {LLAMA!r} and "
                f"{RECURRENT!r}; upgrade craft or re-export the model"
            )
        return cls(**typed)


def oldest_version(spec: ModelSpec) -> int:
    """The oldest format version that holds a file of this spec written with logits_to_keep."""
    return FFN_ROTATION_VERSION if spec.ffn_rotation else LOGITS_TO_KEEP_VERSION


@dataclass(frozen=True)
class Artifact:
    """Everything the metadata of a Craft .onnx file says."""

    spec: ModelSpec
    tokenizer_kind: str
    tokenizer_data: bytes
    bos_id: int
    eos_id: int
    pad_id: int
    quantization: str
    checkpoint_sha256: str
    craft_version: str
    chat_template: str | None = None  # None: the model has no chat template (plain completion only)
    end_of_turn_ids: tuple[int, ...] = ()  # empty: only eos_id ends a reply
    source_kind: str = "run"  # what was exported: a craft-train run, a Hugging Face directory ("hf") or a GGUF file
    attention: str = ATTENTION_STANDARD  # how the graph keeps its KV-cache: one of ATTENTIONS
    format_version: int = FORMAT_VERSION  # what the file's graph is written to (FORMAT_VERSION's history)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end generation: end_of_turn_ids, or eos_id where the file names none."""
        return self.end_of_turn_ids or (self.eos_id,)

    def to_metadata(self) -> dict[str, str]:
        optional = {}
        if self.chat_template is not None:
            optional[META_CHAT_TEMPLATE] = self.chat_template
        if self.end_of_turn_ids:
            optional[META_EOT_IDS] = json.dumps(list(self.end_of_turn_ids))
        if self.source_kind != "run":
            optional[META_SOURCE_KIND] = self.source_kind
        if self.attention != ATTENTION_STANDARD:  # absent means standard, as in files older than the key
            optional[META_ATTENTION] = self.attention
        return optional | {
            META_FORMAT: str(self.format_version),
            META_VERSION: self.craft_version,
            META_CONFIG: self.spec.to_json(),
            META_TOKENIZER_KIND: self.tokenizer_kind,
            META_TOKENIZER: base64.b64encode(self.tokenizer_data).decode("ascii"),
            META_BOS: str(self.bos_id),
            META_EOS: str(self.eos_id),
            META_PAD: str(self.pad_id),
            META_QUANT: self.quantization,
            META_CHECKPOINT: self.checkpoint_sha256,
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str = "model") -> "Artifact":
        """Parse and check; ArtifactError naming `source` if it is not a Craft file of this format."""
        if META_FORMAT not in metadata:
            raise ArtifactError(
                f"{source} is not a Craft model (no '{META_FORMAT}' in its metadata); export one with craft-export"
            )
        version = metadata[META_FORMAT]
        if version not in [str(v) for v in range(1, FORMAT_VERSION + 1)]:
            raise ArtifactError(
                f"{source} has Craft format version {version}, this runtime reads versions 1 to {FORMAT_VERSION}; "
                f"re-export it with craft-export {metadata.get(META_VERSION, '')}".rstrip()
            )
        try:
            spec = ModelSpec.from_json(metadata[META_CONFIG])
            if spec.head_rotation and int(version) < HEAD_ROTATION_VERSION:
                raise ValueError(f"its model config says head_rotation, which format version {version} does not have")
            if spec.ffn_rotation and int(version) < FFN_ROTATION_VERSION:
                raise ValueError(f"its model config says ffn_rotation, which format version {version} does not have")
            attention = metadata.get(META_ATTENTION, ATTENTION_STANDARD)
            if attention not in ATTENTIONS:
                raise ValueError(f"{META_ATTENTION} is '{attention[:40]}', this runtime knows {', '.join(ATTENTIONS)}")
            return cls(
                spec=spec,
                tokenizer_kind=metadata[META_TOKENIZER_KIND],
                tokenizer_data=base64.b64decode(metadata[META_TOKENIZER], validate=True),
                bos_id=int(metadata[META_BOS]),
                eos_id=int(metadata[META_EOS]),
                pad_id=int(metadata[META_PAD]),
                quantization=metadata[META_QUANT],
                checkpoint_sha256=metadata.get(META_CHECKPOINT, ""),
                craft_version=metadata.get(META_VERSION, ""),
                chat_template=metadata.get(META_CHAT_TEMPLATE),
                end_of_turn_ids=parse_token_ids(metadata.get(META_EOT_IDS, "[]"), META_EOT_IDS, spec.vocab_size),
                source_kind=metadata.get(META_SOURCE_KIND, "run"),
                attention=attention,
                format_version=int(version),
            )
        except KeyError as e:
            raise ArtifactError(f"{source} lacks metadata key {e}; re-export it with craft-export") from None
        except ArtifactError as e:
            raise ArtifactError(f"{source}: {e}") from None
        except (ValueError, OverflowError, RecursionError) as e:  # RecursionError: JSON nested past the stack
            raise ArtifactError(
                f"{source} has malformed Craft metadata ({str(e)[:200]}); re-export it with craft-export"
            ) from None


def parse_token_ids(text: str, key: str, vocab_size: int) -> tuple[int, ...]:
    """A JSON list of ids below vocab_size; ValueError (reported as malformed metadata) otherwise."""
    ids = json.loads(text)
    if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < vocab_size for i in ids):
        raise ValueError(f"{key} should be a JSON list of token ids below {vocab_size}, got {text[:60]!r}")
    return tuple(ids)
