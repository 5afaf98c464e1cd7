"""The recurrent sibling of craft.model.Transformer: the same skeleton, a gated linear recurrence
in place of attention, so that generation carries a fixed-size state instead of a growing KV-cache.

    tokens -> embedding -> N x [ x + recurrence(rmsnorm(x)),  x + swiglu(rmsnorm(x)) ] -> rmsnorm -> lm head

The mixing layer (minGRU / Mamba-style diagonal recurrence with an output gate), per channel:

    a_t = sigmoid(x_t W_a + decay)            how much of the state each channel keeps
    h_t = a_t * h_{t-1} + (1 - a_t) * x_t W_v  the state: (B, dim) per layer, whatever the context
    y_t = (h_t * silu(x_t W_g)) W_o

`decay` starts spread so that the channels' memories span 2..256 tokens. Training computes every
h_t at once with a parallel scan (below); decoding is the recurrence itself, one step per token.
A pad (attention_mask 0) sets a_t = 1 and the input to 0: the row's state passes through untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from craft.config import ModelConfig
from craft.model import FeedForward, RMSNorm

State = list[torch.Tensor]  # per layer: (B, dim)


def linear_scan(a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Every h_t of h_t = a_t * h_{t-1} + u_t, h_{-1} = h0, in log2(T) whole-sequence steps.

    a, u: (B, T, D) with 0 <= a <= 1; h0: (B, D); returns h (B, T, D). Each position holds the
    affine map h -> A h + B of the tokens it covers; a Hillis-Steele scan composes it with the map
    `shift` positions earlier, doubling the span each step: (A, B) <- (A * A_l, B + A * B_l).
    Only products of a's and sums are formed (no exp, no division), so nothing overflows however
    small a gets - the closed form exp(cumsum log a) * cumsum(u / exp(cumsum log a)) does within
    tens of tokens. Work T log2(T) D multiply-adds: at T = 256 a small fraction of the matmuls'.
    """
    T = u.shape[1]
    b = torch.cat([a[:, :1] * h0[:, None] + u[:, :1], u[:, 1:]], dim=1)  # h0 folded into the first token
    shift = 1
    while shift < T:
        b = torch.cat([b[:, :shift], b[:, shift:] + a[:, shift:] * b[:, :-shift]], dim=1)
        a = torch.cat([a[:, :shift], a[:, shift:] * a[:, :-shift]], dim=1)
        shift *= 2
    return b


class Recurrence(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.win = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # [a | v | g]
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        tau = torch.exp(torch.linspace(math.log(2.0), math.log(256.0), cfg.dim))  # memory in tokens, 1 / (1 - a)
        self.decay = nn.Parameter(torch.log(tau - 1))  # sigmoid(decay) = 1 - 1 / tau

    def forward(self, x, state, mask):
        """x (B, T, dim), state (B, dim), mask (B, T, 1) float (1 = token, 0 = pad) -> (y, new state)."""
        a_in, v, g = self.win(x).chunk(3, dim=-1)  # (B, T, dim) each
        a = torch.sigmoid(a_in + self.decay) * mask + (1 - mask)  # pads: a = 1
        u = (1 - a) * v  # pads: 0
        h = linear_scan(a, u, state)  # (B, T, dim)
        return self.wo(h * F.silu(g)), h[:, -1]


class RecurrentBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.recurrence_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.recurrence = Recurrence(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, state, mask):
        h, state = self.recurrence(self.recurrence_norm(x), state, mask)
        x = x + self.dropout(h)
        x = x + self.dropout(self.feed_forward(self.ffn_norm(x)))
        return x, state


class Recurrent(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size is set from the tokenizer before the model is built"
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(RecurrentBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():  # as the transformer: residual projections scaled by depth
            if name.endswith(("recurrence.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int64
        targets: torch.Tensor | None = None,  # (B, T) int64; returns the mean cross-entropy too
        *,
        past: State | None = None,  # per layer (B, dim); None: a zero state, and no state returned
        attention_mask: torch.Tensor | None = None,  # (B, P + T) or (B, T), 1 = token, 0 = pad; its last T columns gate
        position_ids: torch.Tensor
        | None = None,  # accepted for the transformer's signature; a recurrence has no positions
    ):
        """Logits (B, T, vocab), plus the loss if targets are given, plus the new state if `past` is given."""
        B, T = input_ids.shape
        use_cache = past is not None
        mask = torch.ones(B, T, 1) if attention_mask is None else attention_mask[:, -T:, None].float()  # (B, T, 1)
        x = self.tok_embeddings(input_ids)  # (B, T, dim)
        present: State = []
        for i, layer in enumerate(self.layers):
            x, state = layer(x, past[i] if use_cache else x.new_zeros(B, self.cfg.dim), mask.to(x.device))
            present.append(state)
        logits = self.output(self.norm(x))  # (B, T, vocab)
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
            return logits, loss
        return (logits, present) if use_cache else logits

    def empty_cache(self, batch: int = 1) -> State:
        """The state before any token: zeros, (batch, dim) per layer (the name is the transformer's)."""
        return [torch.zeros(batch, self.cfg.dim) for _ in self.layers]
