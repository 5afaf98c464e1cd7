"""Import a Hugging Face model directory: config.json + safetensors (one file or shards with their
index) or pytorch_model.bin (read with torch.load(weights_only=True) only).

Architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM - the same decoder as
craft.model with grouped-query heads, tied or untied head, q/k/v biases (Qwen2), an explicit
head_dim and Llama-3 rope scaling where the config says so. Anything else the config asks for
is refused with one line naming it. Weights are renamed to Craft's names (TENSOR_NAMES), their
shapes checked against the config from the file headers, then read as float32.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from craft.checkpoint import zip_problem
from craft.config import ModelConfig
from craft.export.sources import (
    HF,
    MAX_CONTEXT_LENGTH,
    Source,
    SourceError,
    check_config,
    check_finite,
    check_shapes,
    config_number,
    craft_names,
    file_sha256,
    read_json,
    regular_file,
)
from craft.runtime.artifact_check import RANGES

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}  # BF16: raw bits

# Hugging Face name (with {i} for the layer) -> Craft name (craft.model.Transformer's state_dict)
TENSOR_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attention.wq.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attention.wk.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attention.wv.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer older transformers saved; recomputed from the config


MISTRAL_DEFAULT_WINDOW = 4096  # transformers' MistralConfig.sliding_window when config.json has none


def load_hf(directory: Path) -> Source:
    """The model in a Hugging Face directory as a Source; SourceError (one line) if unusable."""
    if not directory.is_dir():
        raise SourceError(
            f"{directory} is not a directory; a Hugging Face model is a directory with config.json, "
            "weights and tokenizer.json"
        )
    config_path = directory / "config.json"
    hf = read_json(config_path, "the model's JSON config")
    if not isinstance(hf, dict):
        raise SourceError(f"{config_path} is not a JSON object; it must be the model's config")
    architecture, cfg = model_config(hf, config_path)
    files, tensors = weight_headers(directory)
    names = craft_names((n for n in tensors if not n.endswith(IGNORED_SUFFIXES)), TENSOR_NAMES, str(directory))
    stored_head = names.pop("output.weight", None) if cfg.tie_embeddings else None
    shapes = {c: tensors[h].shape for c, h in names.items()}
    check_shapes(cfg, shapes, str(directory), TENSOR_NAMES, "num_hidden_layers in config.json")
    state = {c: tensors[h].read() for c, h in names.items()}
    check_finite(state, str(directory), TENSOR_NAMES)
    if stored_head is not None:  # some tied checkpoints store the head too: fine where it is the embedding
        check_tied_head(tensors[stored_head], state["tok_embeddings.weight"], stored_head, config_path)
    return Source(HF, directory, architecture, cfg, state, file_sha256([config_path, *files]))


def check_tied_head(stored, embedding: torch.Tensor, name: str, config_path: Path) -> None:
    """SourceError if a tied model's stored head is not its embedding: transformers 5 then unties
    and uses the stored head, older releases the embedding, so no export would be the model."""
    if tuple(stored.shape) != tuple(embedding.shape) or not torch.equal(stored.read(), embedding):
        raise SourceError(
            f"{config_path} says tie_word_embeddings=true, but the checkpoint's {name} differs from the embedding; "
            "set tie_word_embeddings to false to use the stored head (transformers 5 does), or delete it"
        )


def model_config(hf: dict, where: Path) -> tuple[str, ModelConfig]:
    """(architecture, Craft ModelConfig) from a config.json mapping; SourceError naming what is unsupported."""
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type", "unknown")
    architecture = (  # no architectures: AutoModelForCausalLM's class for the model_type
        architectures[0]
        if isinstance(architectures, list) and architectures
        else MODEL_TYPES.get(model_type, model_type)
        if isinstance(model_type, str)
        else "unknown"
    )
    if architecture not in ARCHITECTURES:
        raise SourceError(
            f"{where}: architecture '{architecture}' is not supported; Craft imports {', '.join(ARCHITECTURES)}"
        )

    def get(key: str, kind: type, default=None):
        """A text or flag field (numbers go through number)."""
        value = hf.get(key)
        value = default if value is None else value  # null is "not given", as transformers reads it
        if value is None:
            raise SourceError(f"{where} lacks '{key}', which a {architecture} config must have")
        if not isinstance(value, kind):
            raise SourceError(f"{where}: '{key}' must be {kind.__name__}, got {json.dumps(value)[:60]}")
        return value

    def number(key: str, kind: type[int] | type[float], lo: float, hi: float = math.inf, default=None, **bounds):
        value = hf.get(key)
        value = default if value is None else value
        if value is None:
            raise SourceError(f"{where} lacks '{key}', which a {architecture} config must have")
        return config_number(value, key, where, kind, lo, hi, **bounds)

    def size(key: str, field: str, default=None) -> int:
        """An integer field within the range craft-run accepts for the ModelSpec field it becomes."""
        return number(key, int, *RANGES[field], default=default)

    def refuse_unless(ok: bool, what: str) -> None:
        if not ok:
            raise SourceError(f"{where}: {what} is not supported by Craft's {architecture} import")

    dim, n_head = size("hidden_size", "dim"), size("num_attention_heads", "n_head")
    refuse_unless(get("hidden_act", str, "silu") == "silu", f"hidden_act '{hf.get('hidden_act')}' (only silu)")
    refuse_unless(not hf.get("mlp_bias", False), "mlp_bias")
    refuse_unless(
        not hf.get("attention_bias", False) or architecture == "Qwen2ForCausalLM", "attention_bias (an o_proj bias)"
    )
    refuse_unless(not hf.get("use_sliding_window", False), "use_sliding_window")
    context = number("max_position_embeddings", int, 1, MAX_CONTEXT_LENGTH)
    if architecture == "MistralForCausalLM":  # within the window, attention is exactly full causal
        if "sliding_window" not in hf:  # transformers' MistralConfig then has its default window
            context = min(context, MISTRAL_DEFAULT_WINDOW)
        elif hf["sliding_window"] is not None:
            context = min(context, number("sliding_window", int, 1))
    rope = rope_settings(hf, where)
    head_dim = size("head_dim", "head_dim", default=dim // n_head)
    cfg = ModelConfig(
        vocab_size=size("vocab_size", "vocab_size"),
        dim=dim,
        n_layer=size("num_hidden_layers", "n_layer"),
        n_head=n_head,
        n_kv_head=size("num_key_value_heads", "n_kv_head", default=n_head),
        ffn_dim=size("intermediate_size", "hidden_dim"),
        context_length=context,
        rope_theta=rope.pop("rope_theta"),
        norm_eps=number("rms_norm_eps", float, 0, 1, default=1e-6, below=True),
        tie_embeddings=get("tie_word_embeddings", bool, False),
        dropout=0.0,
        head_size=head_dim if head_dim * n_head != dim else 0,
        qkv_bias=architecture == "Qwen2ForCausalLM",
        **rope,
    )
    check_config(cfg, where)
    return architecture, cfg


def rope_settings(hf: dict, where: Path) -> dict:
    """rope_theta and the Llama-3 scaling fields of ModelConfig, from rope_theta / rope_scaling
    (transformers 4) or rope_parameters (transformers 5, where a rope_scaling beside it replaces
    it, as transformers 5's convert_rope_params_to_dict does; Craft ignored it)."""
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(hf.get(key) or {}, dict):
            raise SourceError(f"{where}: {key} must be a JSON object or null, got {json.dumps(hf[key])[:60]}")
    name = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(name) or {}
    if params.get("rope_theta") is not None:
        theta, theta_key = params["rope_theta"], f"{name}.rope_theta"
    else:
        theta, theta_key = hf.get("rope_theta") if hf.get("rope_theta") is not None else 10000.0, "rope_theta"
    out = {"rope_theta": config_number(theta, theta_key, where, float, 0, above=True)}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return out
    if kind != "llama3":
        raise SourceError(
            f"{where}: {name} type {json.dumps(kind)[:60]} is not supported; Craft imports no scaling or 'llama3'"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if params.get(k) is None]
    if missing:
        raise SourceError(f"{where}: llama3 {name} lacks {', '.join(missing)}")
    factor, low, high = (
        config_number(params[k], f"{name}.{k}", where, float, 0, above=True)
        for k in ("factor", "low_freq_factor", "high_freq_factor")
    )  # low divides (craft.model.rope_frequencies): above 0
    original = config_number(
        params["original_max_position_embeddings"],
        f"{name}.original_max_position_embeddings",
        where,
        int,
        1,
        MAX_CONTEXT_LENGTH,
    )
    if not high > low:
        raise SourceError(f"{where}: llama3 {name} needs high_freq_factor > low_freq_factor, got {high} and {low}")
    out.update(
        rope_scaling_factor=factor,
        rope_low_freq_factor=low,
        rope_high_freq_factor=high,
        rope_original_context=original,
    )
    return out


# --- weight files ------------------------------------------------------------------------------


class Tensor:
    """A tensor in a weight file: its shape from the header, its data read on demand as float32."""

    def __init__(self, shape: tuple[int, ...], read):
        self.shape = shape
        self.read = read


def weight_headers(directory: Path) -> tuple[list[Path], dict[str, Tensor]]:
    """(weight files, name -> Tensor) of the directory's safetensors (preferred) or pytorch_model.bin."""
    for single, index, reader in (
        (SAFETENSORS, SAFETENSORS_INDEX, safetensors_tensors),
        (TORCH_BIN, TORCH_BIN_INDEX, torch_bin_tensors),
    ):
        if regular_file(directory / single):  # before the shards' index, as transformers looks
            files = [directory / single]
        elif regular_file(directory / index):
            files = shard_files(directory / index)
        else:
            continue
        tensors: dict[str, Tensor] = {}
        found_in: dict[str, Path] = {}
        for file in files:
            for name, tensor in reader(file).items():
                if name in found_in:  # which copy is the model? transformers and Craft could differ
                    raise SourceError(
                        f"{directory}: tensor {name[:100]!r} is in two weight files, {found_in[name].name} and "
                        f"{file.name}; save the model with save_pretrained again"
                    )
                found_in[name], tensors[name] = file, tensor
        return files, tensors
    raise SourceError(
        f"{directory} has no {SAFETENSORS} (or shards with {SAFETENSORS_INDEX}) and no {TORCH_BIN}; "
        f"save the model with save_pretrained"
    )


def shard_files(index: Path) -> list[Path]:
    what = "save_pretrained's shard index, a JSON object with a 'weight_map' of tensor name -> shard file"
    weight_map = read_json(index, what)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(f"{index} is not {what}; save the model with save_pretrained again")
    names = sorted(set(weight_map.values()))
    for name in names:
        if "\0" in name or Path(name).name != name or not regular_file(index.parent / name):
            raise SourceError(f"{index} names shard {name[:100]!r}, which is not a file in {index.parent}")
    return [index.parent / name for name in names]


def safetensors_tensors(path: Path) -> dict[str, Tensor]:
    """Name -> Tensor of a .safetensors file, every offset checked against the file's size."""
    regular_file(path)  # a FIFO would block the read forever
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise SourceError(
                f"{path} is truncated or not a safetensors file (header of {header_len} bytes in a {size}-byte file)"
            )
        try:
            header = json.loads(f.read(header_len), object_pairs_hook=unique_keys)
        except DuplicateKey as e:  # the last copy won here; the safetensors library refuses the file
            twice = str(e)[:100]
            raise SourceError(f"{path}: its safetensors header names {twice!r} twice; the file is corrupt") from None
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the stack
            raise SourceError(
                f"{path} has an unreadable safetensors header; the file is corrupt or truncated"
            ) from None
    if not isinstance(header, dict):
        raise SourceError(
            f"{path}: its safetensors header is a JSON {type(header).__name__}, expected an object of "
            "tensor entries; the file is corrupt"
        )
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise SourceError(f"{path}: its __metadata__ is not an object of strings; the file is corrupt")
    base = 8 + header_len
    tensors, spans = {}, []
    for name, info in header.items():
        dtype, shape, begin, end = header_entry(path, name, info, base, size)
        tensors[name] = Tensor(
            shape, lambda dtype=dtype, shape=shape, offset=base + begin: _read_safetensor(path, dtype, shape, offset)
        )
        spans.append((begin, end, name))
    spans.sort()
    for (_, previous_end, previous), (begin, _, name) in zip(spans, spans[1:]):
        if begin < previous_end:  # two tensors sharing bytes: a writer never does that
            raise SourceError(
                f"{path}: tensors {previous[:100]} and {name[:100]} overlap (bytes {begin} to {previous_end}); "
                "the file is corrupt"
            )
    return tensors


class DuplicateKey(Exception):
    """A JSON object that names one key twice (json.loads keeps the last)."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise DuplicateKey(next(key for i, key in enumerate(keys) if key in keys[:i]))
    return dict(pairs)


def header_entry(path: Path, name: str, info: object, base: int, size: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one safetensors header entry, checked against the format and the
    file's `size` (its data starts at byte `base`); SourceError naming the tensor otherwise."""

    def count(value: object) -> bool:  # a JSON integer >= 0 (not a float like 64.5, not a bool)
        return type(value) is int and value >= 0

    if not (
        isinstance(info, dict)
        and isinstance(info.get("dtype"), str)
        and isinstance(info.get("shape"), list)
        and all(count(d) for d in info["shape"])
        and isinstance(info.get("data_offsets"), list)
        and len(info["data_offsets"]) == 2
        and all(count(o) for o in info["data_offsets"])
    ):
        raise SourceError(
            f"{path}: tensor {name[:100]} has a malformed header entry (expected a dtype string, a shape of "
            "integers >= 0 and two integer data_offsets); the file is corrupt"
        )
    dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise SourceError(
            f"{path}: tensor {name[:100]} has dtype {dtype[:20]}; Craft imports {', '.join(SAFETENSORS_DTYPES)}"
        )
    itemsize = np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
    if end - begin != math.prod(shape) * itemsize:
        raise SourceError(
            f"{path}: tensor {name[:100]} claims {end - begin} bytes for shape {str(list(shape))[:80]} of {dtype}; "
            "the file is corrupt"
        )
    if base + end > size:
        raise SourceError(
            f"{path} is truncated: tensor {name[:100]} ends at byte {base + end}, the file has {size}; "
            "download it again"
        )
    return dtype, shape, begin, end


def _read_safetensor(path: Path, dtype: str, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    count = math.prod(shape)
    raw = np.fromfile(path, dtype=SAFETENSORS_DTYPES[dtype], count=count, offset=offset).reshape(shape)
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return torch.from_numpy((raw.astype(np.uint32) << 16).view(np.float32))
    return torch.from_numpy(raw.astype(np.float32))


def torch_bin_tensors(path: Path) -> dict[str, Tensor]:
    """Name -> Tensor of a pytorch_model.bin, loaded with weights_only=True (no code runs) and mmap."""
    regular_file(path)  # a FIFO would block torch.load forever
    with open(path, "rb") as f:
        problem = zip_problem(f, path.stat().st_size)
    if problem:
        raise SourceError(f"{path}: {problem}; save the model as safetensors instead")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: never point there
        raise SourceError(
            f"{path} holds Python objects besides tensors and plain data; Craft loads it with "
            "torch.load(weights_only=True), as data only, and refused it - save the model as safetensors instead"
        ) from None
    except Exception as e:  # truncated zip, ...: all mean "unusable file"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise SourceError(
            f"cannot load {path} with torch.load(weights_only=True) ({type(e).__name__}: {first}); "
            f"save the model as safetensors instead"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{path} is not a state_dict of tensors")
    if not all(isinstance(k, str) for k in state):
        raise SourceError(f"{path} is not a state_dict: its keys must be tensor names (text)")
    for name, t in state.items():
        if t.device.type != "cpu":  # a meta tensor has a shape and no data
            raise SourceError(f"{path}: tensor {name[:100]} is on device '{t.device.type}', it holds no data to load")
        if t.layout == torch.strided and t.untyped_storage().nbytes() < t.numel() * t.element_size():
            raise SourceError(  # a view with stride 0 (expand): a 3 KB file claimed tensors of 64 GB
                f"{path}: tensor {name[:100]} of shape {list(t.shape)} has {t.untyped_storage().nbytes():,} bytes "
                "of data behind it, fewer than its shape needs; the file is crafted or damaged"
            )
        if t.layout != torch.strided or not t.is_floating_point():
            got = (
                f"of dtype {str(t.dtype).removeprefix('torch.')}"
                if t.layout == torch.strided
                else f"a {str(t.layout).removeprefix('torch.')} tensor"
            )
            raise SourceError(
                f"{path}: tensor {str(name)[:100]} is {got}, "
                "expected a dense floating-point tensor (float32, float16, bfloat16, float64); "
                "save the model's weights as such (or as safetensors)"
            )
    return {name: Tensor(tuple(t.shape), lambda t=t: t.float().clone()) for name, t in state.items()}
