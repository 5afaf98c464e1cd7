"""The Llama-style decoder that Craft trains, exports and runs.

    tokens -> embedding -> N x [ x + attn(rmsnorm(x)),  x + swiglu(rmsnorm(x)) ] -> rmsnorm -> lm head

Causal self-attention with rotary position embeddings (RoPE, in the Hugging Face "rotate half"
layout, so the weights load into transformers' LlamaForCausalLM unpermuted), optional
grouped-query attention (n_kv_head < n_head), SwiGLU MLP, no biases, LM head tied to the
embedding by default. Parameter names follow Meta's / llama2.c's checkpoints.

Imported models (craft.export.sources) use the same module with what their configs say: q/k/v
biases (Qwen2), an untied head, a head width other than dim / n_head, Llama-3 rope scaling.

forward() serves training (no cache, causal) and generation (a KV-cache per layer that it
accepts and returns, with an attention mask and explicit positions for left-padded batches);
the ONNX graph in craft.export.graph computes exactly the same function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from craft.config import ModelConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (key, value), each (B, n_kv_heads, S, head_dim)
MASKED = torch.finfo(torch.float32).min  # additive bias for masked keys: finite, so a row of pads is uniform, not NaN


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Angular frequencies (head_dim / 2,) float64: theta^(-2i/head_dim), then Llama-3 rope scaling
    when cfg.rope_scaling_factor is set: wavelengths longer than original_context / low_freq_factor
    are stretched by the factor, shorter than original_context / high_freq_factor kept, and those
    between interpolated smoothly (transformers' "llama3" rope_type)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    factor = cfg.rope_scaling_factor
    if not factor:
        return inv_freq
    low, high, original = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_context
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)  # 0 at the long end, 1 at the short end
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, interpolated)
    return torch.where(wavelength < original / high, inv_freq, scaled)


def rope_tables(cfg: ModelConfig, divisors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (context_length, head_dim): angle pos * frequency, the half repeated twice.
    divisors (head_dim / 2,): each frequency divided by its own factor, as llama.cpp applies a
    GGUF's rope_freqs.weight (Llama-3 scaling precomputed by its converter)."""
    frequencies = rope_frequencies(cfg)
    if divisors is not None:
        frequencies = frequencies / divisors.to(torch.float64)
    angles = torch.outer(torch.arange(cfg.context_length, dtype=torch.float64), frequencies)  # (length, hd / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, head_dim)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, head_dim); cos, sin: (B, 1, T, head_dim)."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, past=None, bias=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, KV, S, hd)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        if self.n_kv_head != self.n_head:  # query head h reads kv head h // (H / KV)
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, H, S, hd)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, is_causal=bias is None, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H * hd)
        return self.wo(y), present


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, past=None, bias=None):
        h, present = self.attention(self.attention_norm(x), cos, sin, past, bias)
        x = x + self.dropout(h)
        x = x + self.dropout(self.feed_forward(self.ffn_norm(x)))
        return x, present


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size is set from the tokenizer before the model is built"
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 / nanoGPT: scale residual projections by depth
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @classmethod
    def from_state_dict(
        cls, cfg: ModelConfig, state: dict[str, torch.Tensor], rope_divisors: torch.Tensor | None = None
    ) -> "Transformer":
        """A model in eval mode that holds `state`'s tensors themselves (no random init, no copy):
        how imported weights become a model. A tied config's state needs no output.weight;
        rope_divisors as rope_tables takes them."""
        with torch.device("meta"):  # parameters without storage; load_state_dict(assign=True) gives them state's
            model = cls(cfg)
        state = dict(state)
        if cfg.tie_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_embeddings:  # assign made two Parameters of one tensor: make them one again
            model.output.weight = model.tok_embeddings.weight
        model.rope_cos, model.rope_sin = rope_tables(cfg, rope_divisors)  # the buffers were built on meta too
        return model.eval()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int64
        targets: torch.Tensor | None = None,  # (B, T) int64; returns the mean cross-entropy too
        *,
        past: KVCache | None = None,  # per layer (key, value), each (B, KV, P, hd); None or P = 0 for prefill
        attention_mask: torch.Tensor | None = None,  # (B, P + T), 1 = real token, 0 = padding
        position_ids: torch.Tensor | None = None,  # (B, T); default P, P + 1, ...
    ):
        """Logits (B, T, vocab), plus the loss if targets are given, plus the new cache if `past` is given.

        Training calls forward(ids, targets); generation calls forward(ids, past=[...]) and
        gets (logits, present) where present[i] = past[i] with this call's keys/values appended.
        """
        B, T = input_ids.shape
        use_cache = past is not None
        P = past[0][0].shape[2] if use_cache and past else 0
        if position_ids is None:
            position_ids = torch.arange(P, P + T, device=input_ids.device).expand(B, T)
        cos = self.rope_cos[position_ids].unsqueeze(1)  # (B, 1, T, hd)
        sin = self.rope_sin[position_ids].unsqueeze(1)
        bias = None
        if use_cache or attention_mask is not None:
            bias = attention_bias(attention_mask, B, T, P, input_ids.device)
        x = self.tok_embeddings(input_ids)  # (B, T, dim)
        present: KVCache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, past[i] if past else None, bias)
            present.append(kv)
        logits = self.output(self.norm(x))  # (B, T, vocab)
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
            return logits, loss
        return (logits, present) if use_cache else logits

    def empty_cache(self, batch: int = 1) -> KVCache:
        shape = (batch, self.cfg.kv_heads, 0, self.cfg.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in self.layers]


def attention_bias(attention_mask: torch.Tensor | None, B: int, T: int, P: int, device) -> torch.Tensor:
    """Additive bias (B, 1, T, P + T): 0 where query t may read key s (s <= P + t and s is not padding)."""
    S = P + T
    causal = torch.arange(S, device=device)[None, :] <= torch.arange(P, S, device=device)[:, None]  # (T, S)
    allowed = causal[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    zero = torch.zeros((), device=device)
    return torch.where(allowed, zero, torch.tensor(MASKED, device=device)).expand(B, 1, T, S)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network that model.arch names: Transformer, or craft.recurrent.Recurrent (same skeleton and interface)."""
    if cfg.arch == "recurrent":
        from craft.recurrent import Recurrent

        return Recurrent(cfg)
    return Transformer(cfg)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Cached generation in PyTorch: greedy at temperature 0, else temperature + top-k sampling.

    The reference the exported model is checked against; the runtime has its own loop.
    """
    model.eval()
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    past, length = model.empty_cache(), 0
    out: list[int] = []
    for _ in range(max_new_tokens):
        if length + ids.shape[1] > model.cfg.context_length:
            break
        logits, past = model(ids, past=past)
        length += ids.shape[1]
        logits = logits[0, -1].float()
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = (logits - logits.max()) / temperature  # the best at 0: a tiny temperature gives -inf, not nan
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        out.append(token)
        if token == eos_id:
            break
        ids = torch.tensor([[token]], dtype=torch.long)
    return out
