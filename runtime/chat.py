"""Chat: a conversation rendered through the model's own chat template, the KV-cache kept between turns.

    gen = Generator("smollm2.int8.onnx")
    chat = Conversation(gen, system="You are terse.")
    greedy = SamplingParams(temperature=0)
    for piece in chat.reply("What is the capital of France?", greedy):
        print(piece, end="")
    answer = "".join(chat.reply("And of Italy?", greedy))   # prefills only this turn's new tokens

Each turn re-renders the whole conversation with the template the file carries (chat_template.py,
sandboxed) and tokenizes it as Hugging Face's apply_chat_template does: the template writes BOS
itself where the model wants one, so no BOS is prepended. Generator.chat then compares these ids
with the ids whose keys and values are already in the cache (the previous prompt plus the reply as
generated) and prefills only the rest. Where the two diverge - a template that renders earlier turns
differently once a later one exists, a reply whose text tokenizes differently than it was generated,
an edited history - the cache is rolled back to the common prefix (every backend can: the numpy
backend's and an in-place file's caches are preallocated buffers whose length is an index; a
standard file's cache tensors in ONNX Runtime are cut by one copy; a recurrent file's state cannot
forget tokens, so it is rebuilt from the start) and the suffix is prefilled from there. The reply's
tokens equal a fresh prefill of the whole conversation's on the tests' small float32 and int8 models
(int8 activations are quantized per row, so a prefilled chunk sees the numbers a whole prefill
does, up to the attention's summation order; a deep quantized model can tip a near tie - README).

A file without a chat template (every craft-train model) cannot chat: ChatError, one line saying
to drop --chat. Standard library only (+ jinja2 through chat_template.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

from craft.runtime.artifact import Artifact
from craft.runtime.chat_template import render_chat
from craft.runtime.tokenizer import Tokenizer

if TYPE_CHECKING:  # generator.py imports this file
    from craft.runtime.generator import Generator
    from craft.runtime.sampling import SamplingParams


# render_chat's own keywords that Craft sets (add_generation_prompt, a template variable, may be passed)
RENDER_ARGUMENTS = frozenset({"template", "messages", "bos_token", "eos_token", "max_chars"})


class ChatError(ValueError):
    """A chat that cannot be rendered: the model has no chat template, or a message is not text; one
    line with the fix."""


class ContextFull(ValueError):
    """The conversation no longer fits in the context; start a new one (or raise --max-context)."""


def chat_prompt(artifact: Artifact, tokenizer: Tokenizer, messages: Sequence[dict], **variables) -> str:
    """`messages` rendered by the model's template, ending with the assistant's turn opener. ChatError
    without a template; ChatTemplateError (a ValueError) when the template refuses the messages."""
    taken = sorted(RENDER_ARGUMENTS & variables.keys())
    if taken:  # render_chat's own keywords: a collision was a bare TypeError, or replaced its size budget
        raise TypeError(f"template variable(s) {', '.join(taken)} are Craft's own; drop them")
    check_messages(messages)
    return render_chat(
        template_of(artifact),
        list(messages),
        bos_token=special_text(tokenizer, artifact.bos_id),
        eos_token=special_text(tokenizer, artifact.eos_id),
        **variables,
    )


def check_messages(messages: Sequence[dict]) -> None:
    """ChatError unless every message has a text role and text content (a list of content parts, or
    none beside tool_calls, go to the template as they are): the template cannot say which message
    was wrong - a None content read as "the template uses an undefined value"."""
    for i, message in enumerate(messages if isinstance(messages, (list, tuple)) else ()):
        if not isinstance(message, dict):
            continue  # render_chat refuses the list
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise ChatError(f"message {i} needs a 'role' that is text ('system', 'user', ...), got {role!r:.40}")
        if not (isinstance(content, (str, list)) or (content is None and message.get("tool_calls"))):
            raise ChatError(f"message {i} ({role!r:.40}) needs a 'content' that is text (str), got {content!r:.40}")


def chat_ids(artifact: Artifact, tokenizer: Tokenizer, messages: Sequence[dict], **variables) -> list[int]:
    """chat_prompt's token ids; special tokens written in it (<|im_start|>) become their ids."""
    text = chat_prompt(artifact, tokenizer, messages, **variables)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: undecodable bytes smuggled in (surrogateescape), or the template's
        if not all(is_unicode(v) for m in messages for v in m.values()) or not all(map(is_unicode, variables.values())):
            raise ChatError("a message is not valid UTF-8 text (it holds a lone surrogate); pass UTF-8 text") from None
        raise ChatError(
            "the model's chat template writes text that is not valid Unicode (a lone surrogate); re-export the "
            "model with a corrected chat template"
        ) from None
    return tokenizer.encode(text)


def is_unicode(value) -> bool:
    """False for a string holding a lone surrogate; other values are not text the user wrote."""
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def template_of(artifact: Artifact) -> str:
    if artifact.chat_template is None:
        raise ChatError(
            "this model has no chat template (craft-train models and some imported ones have none); "
            "drop --chat to continue plain text"
        )
    return artifact.chat_template


def special_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A special token as templates write it ("<|im_end|>"); "" where the tokenizer has no text for it."""
    id_to_token = getattr(tokenizer, "id_to_token", None)
    return (id_to_token(token_id) if id_to_token else None) or ""


def reusable_prefix(cached_ids: Sequence[int], ids: Sequence[int], cache_length: int, rewinds: bool = True) -> int:
    """How many leading tokens of `ids` the cache already holds: the common prefix of the cached
    ids and the new ones, less one if that is all of `ids` (the last token must run again to give
    logits). 0 when the cache does not hold cached_ids (an interrupted step, a batch since), or when
    it would have to be rolled back and cannot (rewinds False: a recurrent file's state)."""
    if len(cached_ids) != cache_length:
        return 0
    n, limit = 0, min(len(cached_ids), len(ids) - 1)
    while n < limit and cached_ids[n] == ids[n]:
        n += 1
    return n if rewinds or n == len(cached_ids) else 0


class Conversation:
    """The messages of one chat (craft-run --chat): a system prompt, then user and assistant turns."""

    def __init__(self, generator: Generator, system: str | None = None):
        from craft.runtime.generator import Generator  # here: generator.py imports this file

        if not isinstance(generator, Generator):
            raise TypeError(
                f"Conversation takes a Generator, got {type(generator).__name__} (Generator(path) loads one)"
            )
        if not (system is None or isinstance(system, str)):
            raise TypeError(f"system must be text (str) or None, got {type(system).__name__}")
        template_of(generator.artifact)  # ChatError now rather than at the first message
        self.generator, self.system = generator, system
        self.messages: list[dict] = []
        self._open: Iterator[str] | None = None  # the latest reply, which may still be streaming
        self.restart()

    def restart(self) -> None:
        """Forget every turn; the system prompt stays (and stays cached)."""
        if self._open is not None:  # a reply still streaming ends here, not in the new list
            self._open.close()
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []

    def reply(self, text: str, sampling: SamplingParams) -> Iterator[str]:
        """The assistant's answer to `text`, streamed; both become part of the conversation. An answer
        stopped early (Ctrl-C, an exception, the caller stops reading) is kept as far as it got: a
        reply still open when the next one is asked for is closed first, so its turn stays in place
        (left to the garbage collector, it was appended after the later turn)."""
        from craft.runtime.generator import check_sampling

        if not isinstance(text, str):  # refused now, before a turn that never happens joins the conversation
            raise TypeError(f"a message is text (str), got {type(text).__name__}")
        check_sampling(sampling)
        if self._open is not None:
            self._open.close()
        self._open = self._reply({"role": "user", "content": text}, sampling)
        return self._open

    def _reply(self, message: dict, sampling: SamplingParams) -> Iterator[str]:
        self.messages.append(message)
        pieces: list[str] = []
        try:
            for piece in self.generator.chat(self.messages, sampling):
                pieces.append(piece)
                yield piece
        except (ValueError, TypeError):  # TypeError: a template variable of Craft's own, a type check
            if pieces:  # failed mid-answer (logits not finite): the turn happened as far as it got
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
            elif self.messages and self.messages[-1] is message:  # refused before generating: no turn happened
                self.messages.pop()
            raise
        except BaseException:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
            raise
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
