"""The PyTorch model: shapes, KV-cache equivalence, grouped-query heads, padding, presets."""

from __future__ import annotations

import pytest
import torch

from craft.config import ModelConfig, load_config
from craft.model import Transformer, generate


def make(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"vocab_size": 97, "dim": 64, "n_layer": 2, "n_head": 4, "context_length": 32, **kw})
    return Transformer(cfg).eval()


def test_shapes_and_loss():
    model = make()
    ids, targets = torch.randint(0, 97, (2, 3, 10))
    logits, loss = model(ids, targets)
    assert logits.shape == (3, 10, 97)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5  # untrained: near uniform


@pytest.mark.parametrize("n_kv_head", [0, 2, 1])
def test_cached_decode_matches_full_forward(n_kv_head):
    model = make(n_kv_head=n_kv_head)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(ids)
        logits, past = model(ids[:, :7], past=model.empty_cache(2))  # prefill 7
        steps = [logits]
        for t in range(7, 20):  # then one token at a time
            logits, past = model(ids[:, t : t + 1], past=past)
            steps.append(logits)
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max().item() < 1e-5
    assert past[0][0].shape == (2, model.cfg.kv_heads, 20, 16)


def test_grouped_query_attention_has_fewer_kv_parameters():
    mha, gqa = make(), make(n_kv_head=1)
    assert gqa.layers[0].attention.wk.weight.shape == (16, 64)
    assert gqa.num_parameters() < mha.num_parameters()


def test_left_padding_does_not_change_real_positions():
    model = make()
    ids = torch.randint(1, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        plain, _ = model(ids, past=model.empty_cache())
        pad, _ = model(padded, past=model.empty_cache(), attention_mask=mask, position_ids=positions)
    assert (pad[:, 3:] - plain).abs().max().item() < 1e-5
    assert torch.isfinite(pad).all()  # rows of pure padding stay finite


def test_tied_and_untied_heads():
    tied, untied = make(), make(tie_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.num_parameters() == tied.num_parameters() + 97 * 64


def test_generate_greedy_is_deterministic_and_respects_context():
    model = make()
    a = generate(model, [1, 2, 3], 10)
    assert a == generate(model, [1, 2, 3], 10) and len(a) == 10
    assert len(generate(model, list(range(30)), 10)) == 3  # context 32: 30 + 3 tokens, the last never fed back


def test_generate_at_a_tiny_temperature_is_greedy_not_nan():
    """logits / 1e-40 overflowed to inf - inf = nan in the softmax (train.sample_temperature allows it)."""
    model = make()
    generator = torch.Generator().manual_seed(0)
    assert generate(model, [1, 2, 3], 10, temperature=1e-40, generator=generator) == generate(model, [1, 2, 3], 10)


@pytest.mark.parametrize("preset, low, high", [("tiny", 0.7e6, 1.5e6), ("small", 5e6, 9e6), ("base", 85e6, 105e6)])
def test_preset_parameter_counts(preset, low, high):
    cfg = load_config(preset)
    cfg.model.vocab_size = cfg.tokenizer.vocab_size
    with torch.device("meta"):
        n = Transformer(cfg.model).num_parameters()
    print(f"{preset}: {n:,} parameters")
    assert low <= n <= high


def test_small_preset_is_15m_class_with_a_32k_vocabulary():
    cfg = load_config("small", ["tokenizer.vocab_size=32000"]).model
    cfg.vocab_size = 32000
    with torch.device("meta"):
        assert 14e6 < Transformer(cfg).num_parameters() < 16e6
