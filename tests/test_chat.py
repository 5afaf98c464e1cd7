"""Chat and context: Generator.chat / Conversation (the cache kept between turns: a turn prefills only
its new tokens), stopping at end-of-turn ids, --max-context and the memory cap, and craft-run --chat
(one-shot, interactive over a pipe and a terminal, no template).

The models are random-weight ones of a tiny shape (craft.export.exporter.random_run) carrying a
ChatML template and a byte-level BPE tokenizer.json built here with the `tokenizers` library
(<|endoftext|> = 0 = EOS, <|im_start|> = 1 = BOS, <|im_end|> = 2; end-of-turn ids [0, 2]), as
SmolLM2's file does. Where a test needs known answers it scripts them: the real backend runs every
step, and the scripted token's logit is raised so that greedy picks it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from craft.runtime import artifact as A
from craft.runtime.chat import ChatError, Conversation, chat_ids, chat_prompt
from craft.runtime.estimate import estimate, fitting_context, load_profiles, peak_rss_mb
from craft.runtime.generator import CONTEXT_LENGTH, EOS, Generator
from craft.runtime.sampling import SamplingParams

CRAFT_RUN = [sys.executable, "-m", "craft.runtime.cli"]
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "You are a helpful assistant.",
    "Hello there, how are you today? I am fine, thank you for asking.",
    "Tell me a story about a cat and a dog.",
]
IM_END = 2
CONTEXT = 512
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


def chatml_tokenizer():
    tokenizers = pytest.importorskip(
        "tokenizers", reason="the test tokenizer is built with the tokenizers library; pip install tokenizers"
    )
    from craft.runtime.bpe_tokenizer import HFTokenizer

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return HFTokenizer(tok.to_str(), bos_id=1, eos_id=0, pad_id=0, add_bos=False)


def export_random(
    path: Path,
    tokenizer,
    quantize: str,
    context: int = CONTEXT,
    never: tuple[int, ...] = (),
    attention: str = A.ATTENTION_STANDARD,
    arch: str = "llama",
    **metadata: str,
) -> Path:
    """A random model; the `never` ids get a zero head row, so greedy never picks them (a logit of 0
    is below the largest of hundreds of random ones)."""
    import onnx
    import torch

    from craft.config import ModelConfig
    from craft.export.exporter import build_model_proto, random_run

    # untied: a tied random model only repeats its last token
    shape = dict(dim=64, n_layer=2, n_head=4, n_kv_head=2, context_length=context, tie_embeddings=False, arch=arch)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, **shape)
    run = dataclasses.replace(random_run(cfg), tokenizer=tokenizer)
    with torch.no_grad():
        run.model.output.weight[list(never)] = 0.0
    proto = build_model_proto(run, quantize, attention=attention)[0]
    onnx.helper.set_model_props(proto, {p.key: p.value for p in proto.metadata_props} | metadata)
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """fp32 and int8 chat models, an fp32 one with in-place attention (GroupQueryAttention writing
    into preallocated cache buffers), a recurrent one (a state, not a cache), a long-context one whose
    greedy answers never end (they take seconds), and a char-tokenizer model without a template (as
    craft-train's are)."""
    from craft.runtime.tokenizer import CharTokenizer

    folder = tmp_path_factory.mktemp("chat")
    tokenizer = chatml_tokenizer()
    chat = {A.META_CHAT_TEMPLATE: CHATML, A.META_EOT_IDS: f"[0, {IM_END}]"}
    return {
        "fp32": export_random(folder / "chat.fp32.onnx", tokenizer, "none", **chat),
        "int8": export_random(folder / "chat.int8.onnx", tokenizer, "int8", **chat),
        "inplace": export_random(
            folder / "chat.inplace.onnx", tokenizer, "none", attention=A.ATTENTION_INPLACE, **chat
        ),
        "recurrent": export_random(folder / "chat.recurrent.onnx", tokenizer, "none", arch="recurrent", **chat),
        "long": export_random(folder / "chat.long.onnx", tokenizer, "none", 16384, never=(0, IM_END), **chat),
        "plain": export_random(folder / "plain.onnx", CharTokenizer("abcdefghij "), "none"),
    }


def count_forward_tokens(gen: Generator) -> list[int]:
    """The number of tokens each backend.forward call is given, appended as calls happen."""
    calls: list[int] = []
    forward = gen.backend.forward

    def counted(input_ids, *args, **kwargs):
        calls.append(input_ids.shape[1])
        return forward(input_ids, *args, **kwargs)

    gen.backend.forward = counted
    return calls


def script(gen: Generator, tokens: list[int]) -> None:
    """Make greedy decoding produce `tokens` (then the model's own choices): each forward's last
    logits get +1000 on the next scripted token. The network itself still runs every step."""
    forward, queue = gen.backend.forward, list(tokens)

    def scripted(*args, **kwargs):
        logits = forward(*args, **kwargs)
        if queue:
            logits[:, -1, queue.pop(0)] += 1000.0
        return logits

    gen.backend.forward = scripted


# the loop ------------------------------------------------------------------------------------


BACKENDS = [("fp32", "ort"), ("fp32", "numpy"), ("inplace", "ort")]
RECURRENT = [("recurrent", "ort"), ("recurrent", "numpy")]  # a state cannot be rolled back: rebuilt instead


@pytest.mark.parametrize("model, backend", BACKENDS + RECURRENT + [("int8", "ort"), ("int8", "numpy")])
def test_second_turn_prefills_only_its_new_tokens(models, model, backend):
    gen = Generator(models[model], backend=backend)
    calls = count_forward_tokens(gen)
    answer = "The capital of France is Paris."
    answer_ids = gen.tokenizer.encode(answer)
    script(gen, answer_ids + [IM_END])
    chat = Conversation(gen, system="Be brief.")
    assert (
        "".join(chat.reply("What is the capital of France?", SamplingParams(temperature=0, max_new_tokens=50)))
        == answer
    )
    first_prompt = chat_ids(gen.artifact, gen.tokenizer, chat.messages[:2])
    assert gen.last_stats.stop_reason == EOS and gen.last_token_ids == answer_ids  # stopped at <|im_end|>, not kept
    # prefill, then one token per step; <|im_end|> never fed
    assert calls == [len(first_prompt)] + [1] * len(answer_ids)

    calls.clear()
    "".join(chat.reply("And of Italy?", GREEDY))
    new = gen.tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")
    assert calls[0] == len(new) < len(first_prompt)  # the whole first turn, answer included, stayed in the cache
    assert gen.last_stats.reused_tokens == len(first_prompt) + len(answer_ids)
    assert gen.last_stats.prompt_tokens == len(first_prompt) + len(answer_ids) + len(new)


@pytest.mark.parametrize("model, backend", BACKENDS + RECURRENT + [("int8", "ort"), ("int8", "numpy")])
def test_chat_equals_stream_of_the_whole_conversation(models, model, backend):
    """Three turns, each reusing the cache (where the reply's text re-tokenizes differently - this
    random model writes broken UTF-8 - the cache rolls back to the common prefix): every reply equals
    a fresh prefill of the whole rendered conversation, token for token. A recurrent file's state
    cannot roll back: where the ids diverge it is rebuilt from the start, with the same replies."""
    gen = Generator(models[model], backend=backend)
    fresh = Generator(models[model], backend=backend)
    chat = Conversation(gen)
    reused = []
    for text in ("Hello there, how are you today?", "Tell me a story about a cat.", "And a dog?"):
        reply = "".join(chat.reply(text, GREEDY))
        reused.append(gen.last_stats.reused_tokens)
        expected = fresh.generate(chat_prompt(gen.artifact, gen.tokenizer, chat.messages[:-1]), GREEDY)
        assert reply == expected.text and gen.last_token_ids == expected.token_ids and len(reply) > 3
    assert reused[0] == 0 and (model == "recurrent" or all(r > 20 for r in reused[1:]))


def test_a_sentencepiece_style_reply_is_decoded_as_a_text_of_its_own(tmp_path, small_corpus):
    """Llama-2 / Mistral-style tokenizers put a space before the text that their decode drops: a
    reply (as transformers decodes it) has none, so the history does not gain a space per turn."""
    from craft.runtime.bpe_tokenizer import HFTokenizer
    from test_tokenizer_bpe import sentencepiece_style_json

    spec = sentencepiece_style_json(small_corpus.read_text(encoding="utf-8")[:100_000], "metaspace")
    tokenizer = HFTokenizer(spec, bos_id=1, eos_id=2, pad_id=0, add_bos=True)
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    path = export_random(tmp_path / "sp.onnx", tokenizer, "none", **{A.META_CHAT_TEMPLATE: template})
    gen, spaced = Generator(path), 0
    for seed in range(300):  # until a few replies began with a spaced piece (3% of this vocabulary)
        reply = "".join(gen.chat(QUESTION, SamplingParams(max_new_tokens=3, seed=seed)))
        assert reply == gen.tokenizer.decode(gen.last_token_ids), seed
        spaced += gen.tokenizer.token_bytes(gen.last_token_ids[0]).startswith(b" ")
        if spaced == 3:
            break
    assert spaced == 3  # the check above is not vacuous


@pytest.mark.parametrize("model, backend", BACKENDS + RECURRENT)
def test_an_edited_history_rolls_the_cache_back(models, model, backend):
    gen, fresh = Generator(models[model], backend=backend), Generator(models[model], backend=backend)
    first = "".join(gen.chat(QUESTION, GREEDY))
    edited = QUESTION + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Why?"}]
    calls = count_forward_tokens(gen)
    reply = "".join(gen.chat(edited, GREEDY))
    prompt = chat_ids(gen.artifact, gen.tokenizer, edited)
    # up to the reply, where "Paris." differs; a recurrent state cannot go back there: rebuilt from the start
    kept = 0 if model == "recurrent" else len(chat_ids(gen.artifact, gen.tokenizer, QUESTION))
    assert first != "Paris." and gen.last_stats.reused_tokens == kept and calls[0] == len(prompt) - kept
    assert reply == fresh.generate(chat_prompt(gen.artifact, gen.tokenizer, edited), GREEDY).text


def test_stream_and_batch_stop_at_every_end_of_turn_id(models):
    gen = Generator(models["fp32"])
    words = gen.tokenizer.encode(" Paris")
    script(gen, words + [IM_END])
    completion = gen.generate("The capital of France is", SamplingParams(temperature=0, max_new_tokens=40))
    assert completion.text == " Paris" and completion.token_ids == words and completion.stats.stop_reason == EOS
    assert gen.artifact.eos_id != IM_END and gen.artifact.stop_ids == (0, IM_END)


def test_bos_only_where_the_tokenizer_wants_it(models):
    chat_model, plain = Generator(models["fp32"]), Generator(models["plain"])
    assert chat_model.encode_prompt("Hi", 1) == chat_model.tokenizer.encode("Hi")  # add_bos false, as SmolLM2's
    assert plain.encode_prompt("hi", 1) == [plain.artifact.bos_id] + plain.tokenizer.encode("hi")


def test_no_template_is_one_line(models):
    gen = Generator(models["plain"])
    with pytest.raises(ChatError, match="no chat template.*drop --chat"):
        "".join(gen.chat(QUESTION, GREEDY))
    with pytest.raises(ChatError):
        Conversation(gen)


# context -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, backend", BACKENDS)
def test_max_context_caps_the_cache_and_ends_the_reply(models, model, backend):
    gen = Generator(models[model], backend=backend, max_context=60)
    chat = Conversation(gen)
    "".join(chat.reply("Hello there", SamplingParams(temperature=0, max_new_tokens=500)))
    stats = gen.last_stats
    assert stats.stop_reason == CONTEXT_LENGTH and stats.prompt_tokens + stats.generated_tokens == 61
    assert gen.backend.cache_length == 60
    if backend == "numpy":
        assert gen.backend.cache_k[0].shape[2] == 60  # allocated for 60 positions, not the model's 512
    if model == "inplace":
        assert {b.shape[2] for b in gen.backend._buffers} == {60}
    with pytest.raises(
        ValueError, match=r"conversation is \d+ tokens but the context is 60 \(--max-context; the model's is 512\)"
    ):
        "".join(chat.reply("And again", GREEDY))
    with pytest.raises(ValueError, match=f"--max-context must be in 1..{CONTEXT}"):
        Generator(models["fp32"], max_context=CONTEXT + 1)


def test_default_context_is_cut_to_free_memory(models, monkeypatch):
    from craft.runtime import generator as G

    art, size = Generator(models["fp32"]).artifact, models["fp32"].stat().st_size
    per_position = peak_rss_mb(art, size, "ort", 1) - peak_rss_mb(art, size, "ort", 0)
    monkeypatch.setattr(G, "available_memory_mb", lambda: peak_rss_mb(art, size, "ort", 300) + per_position / 2)
    gen = Generator(models["fp32"])
    assert gen.memory_capped and gen.context_length == 300 == fitting_context(art, size, "ort", G.available_memory_mb())
    monkeypatch.setattr(G, "available_memory_mb", lambda: 1e6)
    assert Generator(models["fp32"]).context_length == CONTEXT and not Generator(models["fp32"]).memory_capped
    monkeypatch.setattr(G, "available_memory_mb", lambda: 1.0)  # not even the weights fit: the cap stops at a floor
    assert Generator(models["fp32"]).context_length == min(CONTEXT, G.MIN_DEFAULT_CONTEXT)


def test_estimate_counts_the_cache_at_the_context(models):
    art = Generator(models["fp32"]).artifact
    size = models["fp32"].stat().st_size
    pi4 = next(p for p in load_profiles() if p.name == "pi4")
    full, short = estimate(art, size, pi4), estimate(art, size, pi4, context=64)
    kv_per_position = 2 * 2 * 2 * 16 * 4  # key + value, 2 layers, 2 kv heads, head_dim 16, float32
    assert full.context == CONTEXT and short.context == 64
    assert full.cache_bytes == CONTEXT * kv_per_position and short.cache_bytes == 64 * kv_per_position
    ort_copies = 2  # past + present
    assert full.rss_mb - short.rss_mb == pytest.approx(ort_copies * (CONTEXT - 64) * kv_per_position / 2**20)
    assert full.max_context == CONTEXT  # a Pi 4 holds this model's whole context
    result = run(models["fp32"], "--estimate", "--max-context", "64")
    lines = result.stdout.splitlines()[1:]
    assert result.returncode == 0 and lines and all(line.split()[2] == "64" for line in lines), result.stdout


# craft-run -------------------------------------------------------------------------------------


def run(model: Path, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    """craft-run with bytes in and text out, newlines untranslated (replies hold any character)."""
    result = subprocess.run([*CRAFT_RUN, str(model), *args], input=input, capture_output=True, timeout=120)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


GREEDY_FLAGS = ("-t", "0", "-n", "12", "--threads", "1")  # GREEDY, and one thread as in the Generators below


def test_cli_one_shot_chat_with_system(models):
    gen = Generator(models["fp32"], threads=1)
    expected = "".join(gen.chat(QUESTION, GREEDY))
    result = run(models["fp32"], QUESTION[1]["content"], "--chat", "--system", "Be brief.", *GREEDY_FLAGS)
    assert result.returncode == 0 and result.stdout == expected + "\n" and result.stderr == "", result.stderr
    as_json = run(models["fp32"], QUESTION[1]["content"], "--chat", "--system", "Be brief.", "--json", *GREEDY_FLAGS)
    reply = json.loads(as_json.stdout)
    assert reply["text"] == expected and reply["token_ids"] == gen.last_token_ids
    assert reply["stats"]["stop_reason"] == "max_new_tokens"


def test_cli_chat_over_a_pipe_keeps_the_conversation(models):
    gen = Generator(models["fp32"], threads=1)
    chat = Conversation(gen)
    expected = "".join("".join(chat.reply(text, GREEDY)) + "\n" for text in ("Hello there", "Tell me a story"))
    result = run(models["fp32"], "--chat", "--stats", *GREEDY_FLAGS, input=b"Hello there\n\nTell me a story\n")
    assert result.returncode == 0 and result.stdout == expected, result.stderr
    first, second = result.stderr.splitlines()
    assert "(0 cached)" in first and "(0 cached)" not in second  # turn 2 reused the cache


def test_cli_chat_line_without_end_is_refused(models):
    """A piped message is read a bounded line at a time: `< /dev/zero` was one endless line."""
    with open("/dev/zero", "rb") as zero:
        result = subprocess.run(
            [*CRAFT_RUN, str(models["fp32"]), "--chat", *GREEDY_FLAGS], stdin=zero, capture_output=True, timeout=120
        )
    assert result.returncode == 2 and result.stdout == b"", result.stderr
    assert result.stderr.decode() == (
        "craft-run: error: a chat message on stdin is longer than 16 MiB, more than any context\n"
    )


def test_cli_chat_text_that_is_not_utf8(models):
    """--system is refused like PROMPT; a piped message with bad bytes is skipped and the chat goes on.
    Piped messages are read as UTF-8 whatever the locale (a C locale refused 'héllo')."""
    system = subprocess.run(
        [*CRAFT_RUN, str(models["fp32"]), "hi", "--chat", "--system", b"\xff\xfe"], capture_output=True, timeout=120
    )
    assert system.returncode == 2 and system.stderr.decode().startswith("craft-run: error: --system is not UTF-8")
    piped = subprocess.run(
        [*CRAFT_RUN, str(models["fp32"]), "--chat", *GREEDY_FLAGS],
        input=b"\xff\xfe\nHello there\n",
        capture_output=True,
        timeout=120,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    assert piped.returncode == 2, piped.stderr  # the chat went on, and a script sees that a message was refused
    assert piped.stderr.decode() == (
        "craft-run: error: the message is not UTF-8 text (invalid start byte); it was skipped\n"
        "craft-run: error: 1 message on stdin was refused (above)\n"
    )
    assert (
        piped.stdout.decode()
        == "".join(Conversation(Generator(models["fp32"], threads=1)).reply("Hello there", GREEDY)) + "\n"
    )
    c_locale = subprocess.run(
        [*CRAFT_RUN, str(models["fp32"]), "--chat", *GREEDY_FLAGS],
        input="héllo\n".encode(),
        capture_output=True,
        timeout=120,
        env={**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""},
    )
    assert c_locale.returncode == 0 and c_locale.stderr == b"", c_locale.stderr
    answer = "".join(Conversation(Generator(models["fp32"], threads=1)).reply("héllo", GREEDY)) + "\n"
    assert c_locale.stdout == answer.encode("ascii", "replace")  # an ASCII stdout shows '?' for the rest


def test_cli_context_full_starts_a_new_conversation(models):
    gen = Generator(models["fp32"], threads=1, max_context=60)
    fresh_second = "".join(Conversation(gen).reply("Tell me", GREEDY))
    # 48 + 12 tokens fill the 60: the second message cannot fit after them
    result = run(
        models["fp32"],
        "--chat",
        "--max-context",
        "60",
        *GREEDY_FLAGS,
        input=b"Hello there, how are you today?\nTell me\n",
    )
    assert result.returncode == 0, result.stderr
    assert "the context is full; this message starts a new conversation" in result.stderr
    assert result.stdout.endswith("\n" + fresh_second + "\n")
    one_shot = run(models["fp32"], "Hello there", "--chat", "-t", "0", "-n", "100", "--max-context", "45")
    assert one_shot.returncode == 0
    assert "the context is full (45 tokens); --max-context up to 512 allows more" in one_shot.stderr


def test_cli_chat_message_longer_than_the_context(models):
    """One message that cannot fit asks to shorten it (a new conversation would not help); one of
    megabytes is refused before the template renders it; piped, the session then exits 2."""
    long, huge = b"word " * 2000, b"word " * 300_000
    one_shot = run(models["fp32"], long.decode(), "--chat", *GREEDY_FLAGS)
    assert one_shot.returncode == 2 and one_shot.stdout == ""
    assert one_shot.stderr.startswith("craft-run: error: the conversation is ") and one_shot.stderr.endswith(
        "; shorten the message\n"
    ), one_shot.stderr
    piped = run(models["fp32"], "--chat", *GREEDY_FLAGS, input=huge + b"\nHello there\n")
    assert piped.returncode == 2
    first, last = piped.stderr.splitlines()
    assert "1,500,000 characters, more than a context of" in first and first.endswith("shorten the message")
    assert last == "craft-run: error: 1 message on stdin was refused (above)"
    answer = "".join(Conversation(Generator(models["fp32"], threads=1)).reply("Hello there", GREEDY))
    assert piped.stdout == answer + "\n"


@pytest.mark.parametrize("args", [["hi", "--chat"], ["--chat"]], ids=["one-shot", "interactive"])
def test_cli_chat_without_template_is_one_line(models, args):
    result = run(models["plain"], *args, input=b"hi\n")
    assert result.returncode == 2 and result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("craft-run: error: this model has no chat template")
    assert "drop --chat" in result.stderr


def test_cli_flag_combinations_are_one_line(models):
    for args, words in (
        (["hi", "--system", "x"], "add --chat"),
        (["--chat", "--json"], "drop them"),
        (["hi", "--max-context", "513"], "--max-context must be in 1..512"),
    ):
        result = run(models["fp32"], *args)
        assert result.returncode == 2 and words in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr


def read_until(fd: int, marker: bytes, seen: bytearray, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in {bytes(seen)!r}"
        if select.select([fd], [], [], 0.5)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                return


def exit_code(pid: int, timeout: float = 60) -> int:
    """The child's exit code; killed (and the test failed) if it has not ended within timeout."""
    deadline = time.monotonic() + timeout
    while not (ended := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"craft-run did not exit within {timeout} s")
        time.sleep(0.1)
    return os.waitstatus_to_exitcode(ended[1])


def in_terminal(argv: list[str]) -> None:
    """In the child of pty.fork(): exec argv with Ctrl-C's default. A shell's background job (`cmd &`)
    ignores SIGINT, a child inherits that, and Python then never raises KeyboardInterrupt."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, argv)
    finally:  # exec failed: never let the forked copy of pytest go on
        os._exit(127)


def test_cli_interactive_in_a_terminal(models):
    """A real terminal (readline): the prompt, Ctrl-C stopping an answer and returning to the prompt,
    Ctrl-D ending with 0; then Ctrl-C at the prompt exiting 130, quietly."""
    argv = [*CRAFT_RUN, str(models["long"]), "--chat", "--backend", "numpy", "-n", "100000", "-t", "0"]
    pid, fd = pty.fork()
    if pid == 0:
        in_terminal(argv)
    seen = bytearray()
    read_until(fd, b"> ", seen)
    assert b"Ctrl-D ends" in seen
    os.write(fd, b"Tell me a story\r")
    read_until(fd, b"story\r\n", seen)  # the terminal's echo; the answer then streams for 16000 tokens
    streaming = len(seen) + 64  # once some of the answer is out, Ctrl-C lands in converse()'s try
    deadline = time.monotonic() + 60
    while len(seen) < streaming:
        assert time.monotonic() < deadline, f"no answer streaming: {bytes(seen)!r}"
        if select.select([fd], [], [], 0.5)[0]:
            seen += os.read(fd, 4096)
    os.write(fd, b"QZX")  # typed while the answer streams: the terminal echoed it into the answer
    typed = len(seen)
    while len(seen) < typed + 256:
        assert time.monotonic() < deadline, f"the answer stopped: {bytes(seen)!r}"
        if select.select([fd], [], [], 0.5)[0]:
            seen += os.read(fd, 4096)
    assert b"QZX" not in seen[typed:]
    os.write(fd, b"\x03")
    read_until(fd, b"[stopped]", seen)
    del seen[: seen.index(b"[stopped]")]
    read_until(fd, b"> ", seen)  # back at the prompt
    os.write(fd, b"\x15\x04")  # Ctrl-U (whatever was typed ahead), Ctrl-D
    assert exit_code(pid) == 0
    os.close(fd)

    pid, fd = pty.fork()
    if pid == 0:
        in_terminal(argv)
    seen = bytearray()
    read_until(fd, b"> ", seen)
    time.sleep(1)  # CPython's readline loses a SIGINT that lands between printing the prompt and waiting for keys
    os.write(fd, b"\x03")
    code = exit_code(pid)
    while select.select([fd], [], [], 1)[0]:  # what it wrote before exiting
        try:
            seen += os.read(fd, 4096)
        except OSError:
            break
    os.close(fd)
    assert code == 130 and b"Traceback" not in seen and b"interrupted" not in seen


# SmolLM2 through its own template -----------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's GGUF as a float32 Craft file (not verified here: craft-export's tests do that)."""
    from craft.export.exporter import build_model_proto, load_imported
    from craft.export.sources import GGUF

    run = load_imported(smollm2_gguf, GGUF)
    path = tmp_path_factory.mktemp("smollm2") / "smollm2.none.onnx"
    path.write_bytes(build_model_proto(run, "none")[0].SerializeToString())
    return path


def test_smollm2_answers_through_its_chat_template(smollm2_fp32):
    gen = Generator(smollm2_fp32)
    assert gen.artifact.chat_template and IM_END in gen.artifact.stop_ids and not gen.tokenizer.add_bos
    chat = Conversation(gen)
    greedy = SamplingParams(temperature=0, max_new_tokens=30)
    assert "".join(chat.reply("What is the capital of France?", greedy)) == "The capital of France is Paris."
    first_turn = gen.last_stats.prompt_tokens + gen.last_stats.generated_tokens
    assert "".join(chat.reply("And of Italy?", greedy)) == "The capital of Italy is Rome."
    assert gen.last_stats.reused_tokens == first_turn  # the second turn prefilled only its own tokens


def test_api_chat_refuses_lone_surrogates_and_its_own_keywords(models):
    """generate() refused a lone surrogate but chat() passed it to the tokenizer (a RuntimeError from
    sentencepiece, invalid bytes from others); a template variable named like one of render_chat's
    own keywords was a bare TypeError ('multiple values') or replaced its size budget (max_chars)."""
    import inspect

    from craft.runtime.chat import RENDER_ARGUMENTS, ChatError
    from craft.runtime.chat_template import render_chat

    own = {name for name in inspect.signature(render_chat).parameters if name != "variables"}
    assert RENDER_ARGUMENTS == own - {"add_generation_prompt"}
    gen = Generator(models["fp32"], threads=1)
    with pytest.raises(ChatError, match="not valid UTF-8 text"):
        gen.generate_chat([{"role": "user", "content": "a\udcff"}], GREEDY)
    for name in ("bos_token", "max_chars", "template"):
        with pytest.raises(TypeError, match=f"template variable\\(s\\) {name} are Craft's own"):
            gen.generate_chat([{"role": "user", "content": "hi"}], GREEDY, **{name: "x"})


def test_a_template_that_writes_a_lone_surrogate_is_blamed_not_the_message(models):
    """A file's template rendering '\\ud800' was reported as the user's message not being UTF-8."""
    import dataclasses

    from craft.runtime.chat import ChatError, chat_ids

    gen = Generator(models["fp32"], threads=1)
    broken = dataclasses.replace(gen.artifact, chat_template="{{ '\\ud800' }}{{ messages[0]['content'] }}")
    with pytest.raises(ChatError, match="the model's chat template writes text that is not valid Unicode"):
        chat_ids(broken, gen.tokenizer, [{"role": "user", "content": "hi"}])
    with pytest.raises(ChatError, match="a message is not valid UTF-8 text"):
        chat_ids(broken, gen.tokenizer, [{"role": "user", "content": "a\udcff"}])


def test_a_reply_left_open_keeps_its_turn_in_place(models):
    """A reply read part-way and dropped: the next reply followed two user turns in a row, and when
    the garbage collector finalized the first, its answer landed after the later turn."""
    gen = Generator(models["long"])
    chat = Conversation(gen)
    first = chat.reply("Hi", SamplingParams(temperature=0, max_new_tokens=20))
    assert next(first)  # read part-way, never closed
    second = "".join(chat.reply("And you?", SamplingParams(temperature=0, max_new_tokens=3)))
    roles = [m["role"] for m in chat.messages]
    assert roles == ["user", "assistant", "user", "assistant"] and chat.messages[3]["content"] == second
    del first  # finalizing it now changes nothing
    assert [m["role"] for m in chat.messages] == roles


def test_stats_of_a_stream_stopped_early(models):
    """Closed after 5 tokens, last_stats said 0 generated, no stop reason, peak RSS 0."""
    from craft.runtime.generator import STOPPED

    gen = Generator(models["long"])
    stream = gen.stream("hello", SamplingParams(temperature=0, max_new_tokens=50))
    for _ in range(5):
        next(stream)
    stream.close()
    stats = gen.last_stats
    assert (stats.generated_tokens, stats.stop_reason) == (len(gen.last_token_ids), STOPPED) and stats.peak_rss_mb > 0
    assert stats.generated_tokens >= 5
    batch = gen.generate_batch(iter(["hello", "hi there"]), SamplingParams(temperature=0, max_new_tokens=10))
    assert len(batch) == 2 and all(c.stats.decode_tokens_per_s > 0 for c in batch)  # was always 0.0


def test_an_interrupted_rewind_keeps_the_cache_and_its_buffers_together(models):
    """ONNX Runtime's OrtValues do not keep their numpy arrays alive: a Ctrl-C between replacing a
    standard file's cache buffers and its OrtValues left the cache wrapping freed memory, which the
    next turn reused (non-finite logits, or a crash)."""
    gen = Generator(models["fp32"], backend="ort", threads=1)
    gen.generate("hello there, how are you today?", GREEDY)
    backend = gen.backend
    buffers, cache, length, wrap = backend._buffers, backend.cache, backend.cache_length, backend._ortvalue

    def interrupted(array):
        raise KeyboardInterrupt

    backend._ortvalue = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            backend.rewind(length - 3)
    finally:
        backend._ortvalue = wrap
    assert backend._buffers is buffers and backend.cache is cache and backend.cache_length == length


def test_a_stream_stepped_from_two_threads_frees_the_generator(models):
    """A thread pool steps a stream from whichever worker is free (Starlette's iterate_in_threadpool):
    the stream ended in another thread than it began, and the Generator stayed claimed for good
    (only an RLock's owner may release it)."""
    import threading

    gen = Generator(models["fp32"], threads=1)
    stream = gen.stream("hello there", GREEDY)
    worker = threading.Thread(target=lambda: next(stream))
    worker.start()
    worker.join()
    rest = "".join(stream)  # finished here, in the main thread
    assert gen.last_stats.stop_reason in ("max_new_tokens", "eos") and rest is not None
    again = []
    worker = threading.Thread(target=lambda: again.append(gen.generate("hello there", GREEDY)))
    worker.start()
    worker.join()
    assert again and again[0].token_ids == gen.generate("hello there", GREEDY).token_ids


@pytest.mark.parametrize("call", ["generate", "generate_chat"])
def test_generate_returns_its_own_ids_when_another_thread_generates_right_after(models, call):
    """generate() and generate_chat() read last_token_ids / last_stats after their stream had released
    the Generator: a generation that another thread began in that gap made them return its ids and stats."""
    import contextlib
    import threading

    def run(g: Generator, prompt: str, tokens: int):
        params = SamplingParams(max_new_tokens=tokens, temperature=0)
        if call == "generate":
            return g.generate(prompt, params)
        return g.generate_chat([{"role": "user", "content": prompt}], params)

    expected = run(Generator(models["long"], threads=1), "hello there", 3)  # its answers never end
    gen = Generator(models["long"], threads=1)
    claimed, other = gen._claimed, []

    @contextlib.contextmanager
    def claimed_then_another_thread():
        with claimed():
            yield
        if threading.current_thread() is threading.main_thread() and not gen._claims and not other:
            worker = threading.Thread(target=lambda: other.append(run(gen, "good bye", 9)))
            worker.start()
            worker.join(60)

    gen._claimed = claimed_then_another_thread
    got = run(gen, "hello there", 3)
    assert len(other[0].token_ids) == 9  # the other thread generated as soon as this call's claim ended
    assert got.token_ids == expected.token_ids and got.stats.generated_tokens == 3


def test_one_generator_in_two_threads_fails_clearly(models, tmp_path):
    """Two threads inside one ONNX Runtime IOBinding corrupted the heap: 'double free or corruption',
    the process aborted. In a child process, so that the old behaviour fails the test, not pytest."""
    code = f"""
import threading
from craft.runtime.generator import Generator, GenerationError, CacheReplaced
from craft.runtime.sampling import SamplingParams
gen = Generator({str(models["long"])!r}, threads=1)
greedy = SamplingParams(temperature=0, max_new_tokens=30)
expected = gen.generate("hello there", greedy)
errors, done = [], []
def work():
    for _ in range(20):
        try:
            got = gen.generate("hello there", greedy)
            done.append((got.text, got.token_ids) == (expected.text, expected.token_ids))
        except (GenerationError, CacheReplaced) as e:
            errors.append(type(e).__name__)
threads = [threading.Thread(target=work) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(done), sum(done), len(errors))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    done, right, failed = map(int, result.stdout.split())
    assert done + failed == 40 and done > 0 and right == done  # what is not refused is right


def test_conversation_refuses_bad_arguments_and_keeps_its_history(models):
    """A reply refused for its sampling argument (a TypeError, which only ValueError's branch undid) left
    the user turn and an empty assistant turn in the history; no Generator was an AttributeError."""
    gen = Generator(models["fp32"], threads=1)
    for bad in (None, str(models["fp32"])):
        with pytest.raises(TypeError, match="Conversation takes a Generator"):
            Conversation(bad)
    with pytest.raises(TypeError, match="system must be text"):
        Conversation(gen, system=5)
    chat = Conversation(gen, system="Be brief.")
    "".join(chat.reply("hello there", GREEDY))
    history = [dict(m) for m in chat.messages]
    for text, sampling, pattern in (
        ("again", None, "sampling must be a SamplingParams"),
        ("again", {"temperature": 0}, "sampling must be a SamplingParams"),
        (None, GREEDY, "a message is text"),
        (5, GREEDY, "a message is text"),
    ):
        with pytest.raises(TypeError, match=pattern):
            "".join(chat.reply(text, sampling))
        assert chat.messages == history
    assert "".join(chat.reply("again", GREEDY)) and len(chat.messages) == len(history) + 2


@pytest.mark.parametrize(
    "message, pattern",
    [
        ({"role": "user", "content": None}, r"message 1 \('user'\) needs a 'content' that is text"),
        ({"role": "user", "content": 5}, r"message 1 \('user'\) needs a 'content' that is text"),
        ({"role": "user"}, r"message 1 \('user'\) needs a 'content'"),
        ({"content": "hi"}, r"message 1 needs a 'role' that is text"),
        ({"role": 3, "content": "hi"}, r"message 1 needs a 'role' that is text"),
    ],
)
def test_a_message_that_is_not_text_is_named(models, message, pattern):
    """A message's None or numeric content was blamed on the template ("it uses an undefined value")."""
    gen = Generator(models["fp32"], threads=1)
    with pytest.raises(ChatError, match=pattern) as e:
        gen.generate_chat([{"role": "system", "content": "Be brief."}, message], GREEDY)
    assert "\n" not in str(e.value)
