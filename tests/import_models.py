"""Random-init transformers models, and GGUF files written from them, for the import tests.

Weights are drawn with a larger spread than transformers' init (std 0.02 makes every logit
nearly equal, which hides errors); biases are non-zero so that a dropped bias shows. transformers
and gguf are dev-only dependencies: the tests that use this module skip without them.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import torch

VOCAB = 300  # room for a CharTokenizer (258 reserved ids + characters), so exported files run in craft-run
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def random_hf_model(architecture: str, seed: int = 0, **overrides):
    """A LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM of SMALL's shape (plus overrides),
    eval mode, float32, with random weights of std 0.15 and RMSNorm gains around 1."""
    import transformers as T

    config_cls, model_cls = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        "mistral": (T.MistralConfig, T.MistralForCausalLM),
    }[architecture]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


@torch.no_grad()
def reference_logits(model, prompt: list[int], steps: int = 8) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' logits on a prefill of `prompt` and `steps` cached greedy steps:
    (every token fed, [prefill logits (T, vocab), step 1 logits (1, vocab), ...])."""
    name = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )  # transformers 5.x renamed it
    out = model(torch.tensor([prompt]), use_cache=True)
    fed, logits, cache = list(prompt), [out.logits[0]], getattr(out, name)
    for _ in range(steps):
        token = int(logits[-1][-1].argmax())
        out = model(torch.tensor([[token]]), use_cache=True, **{name: cache})
        fed.append(token)
        logits.append(out.logits[0])
        cache = getattr(out, name)
    return fed, logits


@torch.no_grad()
def craft_logits(model, fed: list[int], prompt_length: int) -> list[torch.Tensor]:
    """craft.model.Transformer's logits for the same feed: prefill, then one cached token at a time."""
    logits, past = model(torch.tensor([fed[:prompt_length]]), past=model.empty_cache())
    out = [logits[0]]
    for token in fed[prompt_length:]:
        logits, past = model(torch.tensor([[token]]), past=past)
        out.append(logits[0])
    return out


# Craft's PyTorch model vs transformers: measured 2.7e-6 to 5.5e-6 (a head_dim != dim / n_head Mistral) on an
# AVX-512 Xeon; torch's CPU kernels sum in another order on another instruction set
TORCH_TOLERANCE = 2e-5


def max_diff(a: list, b: list) -> float:
    return max(
        float(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).max()) for x, y in zip(a, b, strict=True)
    )


CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def save_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer.json of exactly VOCAB ids (256 bytes, <s>, </s>, merges), trained on
    the bundled English text with the `tokenizers` library, and a tokenizer_config.json naming the
    specials and a chat template: a real tokenizer for the random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from craft.export.exporter import PERPLEXITY_TEXT

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([PERPLEXITY_TEXT.read_text(encoding="utf-8")], trainer)
    assert tokenizer.get_vocab_size() == VOCAB
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "tokenizer.json"


def ort_logits(path: Path, fed: list[int], prompt_length: int) -> list[np.ndarray]:
    """An exported file's logits under ONNX Runtime for the same feed as reference_logits."""
    from craft.export.verify import ort_forward, ort_session
    from craft.runtime.artifact import Artifact
    from craft.runtime.onnx_file import read_metadata

    spec = Artifact.from_metadata(read_metadata(path)).spec
    session = ort_session(path.read_bytes())
    logits, past = ort_forward(session, spec, np.array([fed[:prompt_length]]), None)
    out = [logits[0]]
    for token in fed[prompt_length:]:
        logits, past = ort_forward(session, spec, np.array([[token]]), past)
        out.append(logits[0])
    return out


def numpy_logits(path: Path, fed: list[int], prompt_length: int) -> list[np.ndarray]:
    """The same feed through the runtime's numpy backend."""
    from craft.runtime.artifact import Artifact
    from craft.runtime.numpy_backend import NumpyBackend
    from craft.runtime.onnx_file import read_metadata

    art = Artifact.from_metadata(read_metadata(path))
    backend = NumpyBackend(str(path), art.spec, art.quantization)
    backend.reset(1)
    out = []
    for chunk in [fed[:prompt_length]] + [[t] for t in fed[prompt_length:]]:
        mask = np.ones((1, backend.cache_length + len(chunk)), np.int64)
        positions = np.arange(backend.cache_length, backend.cache_length + len(chunk))[None]
        out.append(backend.forward(np.array([chunk]), mask, positions)[0])
    return out


def llama3_rope_factors(scaling: dict, head_dim: int) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py computes it from a "llama3"
    rope_scaling: the divisor of each RoPE frequency (head_dim / 2,), float32."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    freqs = 1.0 / scaling["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def write_gguf(model, path: Path, qtype: str = "F32", pre: str = "default") -> Path:
    """A llama GGUF of a transformers Llama model, as llama.cpp's converter writes it: metadata
    keys, GGUF tensor names, q/k rows permuted for llama.cpp's RoPE; 2-D weights in `qtype`
    (F32, F16, Q8_0 or Q4_1 via gguf.quants; with Q4_1 the embedding and output stay Q8_0, as in
    llama.cpp's Q4_1 files), norms in F32; save_tokenizer's tokenizer as tokenizer.ggml.* (with `pre`
    as tokenizer.ggml.pre); a "llama3" rope scaling as rope_freqs.weight (llama3_rope_factors)."""
    import gguf

    from craft.export.source_gguf import permute_rope_rows

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * c.num_attention_heads != c.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(
        float(c.rope_parameters["rope_theta"]) if getattr(c, "rope_parameters", None) else float(c.rope_theta)
    )
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(
        {"F32": gguf.LlamaFileType.ALL_F32, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}.get(
            qtype, gguf.LlamaFileType.MOSTLY_Q8_0
        )
    )
    spec = json.loads(save_tokenizer(path.parent).read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in spec["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_chat_template(CHAT_TEMPLATE)
    scaling = getattr(c, "rope_parameters", None) or {}
    if scaling.get("rope_type") == "llama3":  # as llama.cpp's converter: the factors as a tensor, no metadata
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(scaling, head_dim))

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not c.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}": f"blk.{i}.{g}" for hf, g in per_layer.items()})
    for hf_name, name in names.items():
        w = sd[hf_name]
        if name.endswith("attn_q.weight"):
            w = permute_rope_rows(w, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = permute_rope_rows(w, c.num_key_value_heads)
        if w.ndim == 1 or qtype == "F32":
            writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
        else:
            kind = gguf.GGMLQuantizationType[
                "Q8_0" if qtype == "Q4_1" and name in ("token_embd.weight", "output.weight") else qtype
            ]
            writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)  # bytes; the shape follows
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
