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
import struct
from pathlib import Path

import numpy as np
import torch

from craft.config import ModelConfig
from craft.export.sources import HF, Source, SourceError, check_shapes, file_sha256, rename

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
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


def load_hf(directory: Path) -> Source:
    """The model in a Hugging Face directory as a Source; SourceError (one line) if unusable."""
    config_path = directory / "config.json"
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"cannot read {config_path} ({e}); it must be the model's JSON config") from None
    if not isinstance(hf, dict):
        raise SourceError(f"{config_path} is not a JSON object; it must be the model's config")
    architecture, cfg = model_config(hf, config_path)
    files, tensors = weight_headers(directory)
    craft_names = {rename(name, TENSOR_NAMES): name for name in tensors if not name.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_embeddings:
        craft_names.pop("output.weight", None)  # some tied checkpoints store the head too: it is the embedding
    check_shapes(cfg, {c: tensors[h].shape for c, h in craft_names.items()}, str(directory), TENSOR_NAMES)
    state = {c: tensors[h].read() for c, h in craft_names.items()}
    return Source(HF, directory, architecture, cfg, state, file_sha256([config_path, *files]))


def model_config(hf: dict, where: Path) -> tuple[str, ModelConfig]:
    """(architecture, Craft ModelConfig) from a config.json mapping; SourceError naming what is unsupported."""
    architectures = hf.get("architectures") or []
    architecture = (
        architectures[0] if isinstance(architectures, list) and architectures else hf.get("model_type", "unknown")
    )
    if architecture not in ARCHITECTURES:
        raise SourceError(
            f"{where}: architecture '{architecture}' is not supported; Craft imports {', '.join(ARCHITECTURES)}"
        )

    def get(key: str, kind: type, default=None):
        value = hf.get(key, default)
        if value is None:
            raise SourceError(f"{where} lacks '{key}', which a {architecture} config must have")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise SourceError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
        return value

    def refuse_unless(ok: bool, what: str) -> None:
        if not ok:
            raise SourceError(f"{where}: {what} is not supported by Craft's {architecture} import")

    dim, n_head = get("hidden_size", int), get("num_attention_heads", int)
    refuse_unless(get("hidden_act", str, "silu") == "silu", f"hidden_act '{hf.get('hidden_act')}' (only silu)")
    refuse_unless(not hf.get("mlp_bias", False), "mlp_bias")
    refuse_unless(
        not hf.get("attention_bias", False) or architecture == "Qwen2ForCausalLM", "attention_bias (an o_proj bias)"
    )
    refuse_unless(not hf.get("use_sliding_window", False), "use_sliding_window")
    context = get("max_position_embeddings", int)
    if architecture == "MistralForCausalLM" and hf.get("sliding_window") is not None:
        context = min(context, get("sliding_window", int))  # within the window, attention is exactly full causal
    rope = rope_settings(hf, where)
    head_dim = get("head_dim", int, dim // n_head)
    cfg = ModelConfig(
        vocab_size=get("vocab_size", int),
        dim=dim,
        n_layer=get("num_hidden_layers", int),
        n_head=n_head,
        n_kv_head=get("num_key_value_heads", int, n_head),
        ffn_dim=get("intermediate_size", int),
        context_length=context,
        rope_theta=rope.pop("rope_theta"),
        norm_eps=get("rms_norm_eps", float, 1e-6),
        tie_embeddings=get("tie_word_embeddings", bool, False),
        dropout=0.0,
        head_size=head_dim if head_dim * n_head != dim else 0,
        qkv_bias=architecture == "Qwen2ForCausalLM",
        **rope,
    )
    for key in ("vocab_size", "dim", "n_layer", "n_head", "ffn_dim", "context_length"):
        if getattr(cfg, key) <= 0:
            raise SourceError(f"{where}: {key} must be positive, got {getattr(cfg, key)}")
    if cfg.n_kv_head <= 0 or cfg.n_head % cfg.n_kv_head or cfg.head_dim % 2:
        raise SourceError(
            f"{where}: {cfg.n_head} heads, {cfg.n_kv_head} key-value heads of width {cfg.head_dim}: "
            f"heads must be a multiple of key-value heads and the width even"
        )
    return architecture, cfg


def rope_settings(hf: dict, where: Path) -> dict:
    """rope_theta and the Llama-3 scaling fields of ModelConfig, from rope_theta / rope_scaling
    (transformers 4) or rope_parameters (transformers 5)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise SourceError(f"{where}: rope_scaling must be a JSON object or null, got {params!r}")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind != "llama3":
        raise SourceError(f"{where}: rope_scaling type '{kind}' is not supported; Craft imports no scaling or 'llama3'")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if not isinstance(params.get(k), (int, float))]
    if missing:
        raise SourceError(f"{where}: llama3 rope_scaling lacks {', '.join(missing)}")
    if not params["high_freq_factor"] > params["low_freq_factor"] or params["factor"] <= 0:
        raise SourceError(f"{where}: llama3 rope_scaling needs factor > 0 and high_freq_factor > low_freq_factor")
    out.update(
        rope_scaling_factor=float(params["factor"]),
        rope_low_freq_factor=float(params["low_freq_factor"]),
        rope_high_freq_factor=float(params["high_freq_factor"]),
        rope_original_context=int(params["original_max_position_embeddings"]),
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
        if (directory / index).is_file():
            files = shard_files(directory / index)
        elif (directory / single).is_file():
            files = [directory / single]
        else:
            continue
        tensors: dict[str, Tensor] = {}
        for file in files:
            tensors.update(reader(file))
        return files, tensors
    raise SourceError(
        f"{directory} has no {SAFETENSORS} (or shards with {SAFETENSORS_INDEX}) and no {TORCH_BIN}; "
        f"save the model with save_pretrained"
    )


def shard_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SourceError(f"cannot read the shard index {index} ({e}); it must be save_pretrained's JSON") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not (index.parent / name).is_file():
            raise SourceError(f"{index} names shard {name!r}, which is not a file in {index.parent}")
    return [index.parent / name for name in names]


def safetensors_tensors(path: Path) -> dict[str, Tensor]:
    """Name -> Tensor of a .safetensors file, every offset checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise SourceError(
                f"{path} is truncated or not a safetensors file (header of {header_len} bytes in a {size}-byte file)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SourceError(
                f"{path} has an unreadable safetensors header; the file is corrupt or truncated"
            ) from None
    header.pop("__metadata__", None)
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path}: tensor {name} has a malformed header entry; the file is corrupt") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise SourceError(f"{path}: tensor {name} has dtype {dtype}; Craft imports {', '.join(SAFETENSORS_DTYPES)}")
        itemsize = np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if end - begin != math.prod(shape) * itemsize or not 0 <= begin <= end:
            raise SourceError(
                f"{path}: tensor {name} claims {end - begin} bytes for shape {list(shape)} of {dtype}; "
                "the file is corrupt"
            )
        if base + end > size:
            raise SourceError(
                f"{path} is truncated: tensor {name} ends at byte {base + end}, the file has {size}; download it again"
            )
        tensors[name] = Tensor(
            shape, lambda dtype=dtype, shape=shape, offset=base + begin: _read_safetensor(path, dtype, shape, offset)
        )
    return tensors


def _read_safetensor(path: Path, dtype: str, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    count = math.prod(shape)
    raw = np.fromfile(path, dtype=SAFETENSORS_DTYPES[dtype], count=count, offset=offset).reshape(shape)
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return torch.from_numpy((raw.astype(np.uint32) << 16).view(np.float32))
    return torch.from_numpy(raw.astype(np.float32))


def torch_bin_tensors(path: Path) -> dict[str, Tensor]:
    """Name -> Tensor of a pytorch_model.bin, loaded with weights_only=True (no code runs) and mmap."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, pickle refused by weights_only, ...: all mean "unusable file"
        raise SourceError(
            f"cannot load {path} with torch.load(weights_only=True) ({str(e).splitlines()[0]}); "
            f"save the model as safetensors instead"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{path} is not a state_dict of tensors")
    return {name: Tensor(tuple(t.shape), lambda t=t: t.float().clone()) for name, t in state.items()}
