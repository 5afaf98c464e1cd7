"""The peer: ONNX Runtime GenAI running a model of the same shape, built by its own model builder.

GenAI is what ONNX Runtime's authors ship for LLM decode on CPU (GroupQueryAttention with an
in-place KV buffer, fused norms, MatMulNBits), so "Craft's decode must not fall behind it" is
the bar that says the graph and the loop are not leaving speed on the table. Its builder reads a
Hugging Face directory: we write a random-weight LlamaForCausalLM of the requested shape (the
weights do not matter for speed) with a word-level tokenizer, and run
`python -m onnxruntime_genai.models.builder -p int8|int4 -e cpu` on it.

Needs the `onnxruntime-genai` package (in the [dev] extra) and transformers (in [train]).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build_genai_model(
    folder: Path,
    precision: str,
    *,
    vocab_size: int,
    dim: int,
    n_layer: int,
    n_head: int,
    n_kv_head: int,
    ffn_dim: int,
    context_length: int,
) -> Path:
    """A GenAI model folder (model.onnx + genai_config.json) of this shape, random weights; precision int8 | int4."""
    hf = folder / "hf"
    if not (hf / "config.json").exists():
        import torch
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=dim,
            intermediate_size=ffn_dim,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_kv_head,
            max_position_embeddings=context_length,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
        )
        LlamaForCausalLM(cfg).save_pretrained(hf)
        words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=words, bos_token="t1", eos_token="t2", unk_token="t0").save_pretrained(
            hf
        )
    out = folder / precision
    subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            str(folder / "cache"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return out


class GenAIDecoder:
    """One GenAI model loaded with `threads` intra-op threads; greedy decode timed per token."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.overlay(
            json.dumps(
                {
                    "model": {
                        "decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}
                    }
                }
            )
        )
        self.model = og.Model(config)

    def seconds_per_token(self, prompt: np.ndarray, new_tokens: int) -> float:
        """Prefill `prompt` (untimed), then `new_tokens` greedy steps; seconds per step. min_length
        keeps a random model's EOS from ending the run early. append_tokens runs the prefill; each
        generate_next_token picks a token from the logits it has, then runs the model on it at the
        next call: the first call (a pick, no model run) is left out of the timing."""
        total = len(prompt) + 1 + new_tokens
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(prompt.astype(np.int32))
        gen.generate_next_token()  # the prefill's token
        t = time.perf_counter()
        for _ in range(new_tokens):
            gen.generate_next_token()
        return (time.perf_counter() - t) / new_tokens
