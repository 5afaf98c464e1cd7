"""The tokenizer and chat template of an imported model, from a Hugging Face directory or a GGUF file.

Both give a TokenizerSource: a Hugging Face tokenizer.json (what craft.runtime.bpe_tokenizer
runs), the special ids, whether a plain prompt starts with BOS, every id that ends a turn, and
the chat template (None when the source has none):

    source = read_hf_tokenizer("SmolLM2-135M-Instruct/")      # tokenizer.json + tokenizer_config.json
    source = read_gguf_tokenizer("model.Q4_1.gguf")           # tokenizer.ggml.* metadata
    tokenizer = source.tokenizer()                            # an HFTokenizer for the artifact

A GGUF carries no tokenizer.json, so one is built from `tokenizer.ggml.model`: "gpt2" is
byte-level BPE with the file's merges and the split regex that `tokenizer.ggml.pre` names;
"llama" is sentencepiece-style BPE whose merges are recovered from the token scores (llama.cpp
merges by score; transformers' GGUF loader recovers them the same way), with the "\u2581" prefix
where sentencepiece and llama.cpp put it (Llama 2's tokenizer.json normalizer, not Metaspace).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from craft.export.sources import SourceError, config_number, gguf_field, parse_json, regular_file
from craft.run_dir import read_small
from craft.runtime.bpe_pretokenizer import BYTE_CHAR
from craft.runtime.bpe_tokenizer import HFTokenizer, check_shape
from craft.runtime.chat_template import MAX_CHARS, ChatTemplateError, compile_template
from craft.runtime.tokenizer import META_SPACE


class TokenizerSourceError(ValueError):
    """A source whose tokenizer cannot be read; one line naming the file and the fix."""


def token_id_field(value: object, key: str, where: object, vocab_size: int) -> int:
    """A special token id as read from the source (`key` of `where`): an integer inside the
    tokenizer's vocabulary, so that verification and craft-run can embed it."""
    try:
        return config_number(value, key, where, int, 0, vocab_size - 1)
    except SourceError as e:
        raise TokenizerSourceError(f"{e} - a token id of the {vocab_size}-token vocabulary") from None


def checked_template(template: object, where: str) -> str | None:
    """The chat template if it is text that parses (craft.runtime.chat_template compiles it only: nothing
    renders); TokenizerSourceError otherwise, so that no file carries a template craft-run refuses."""
    if template is None:
        return None
    if not isinstance(template, str):
        raise TokenizerSourceError(
            f"{where}: the chat template is a {type(template).__name__}, expected Jinja text; fix or remove it"
        )
    try:
        template.encode("utf-8")  # JSON may hold "\ud800": no file's metadata can
    except UnicodeEncodeError as e:
        raise TokenizerSourceError(
            f"{where}: the chat template is not valid Unicode (a lone surrogate at character {e.start}); fix it or "
            "remove it"
        ) from None
    if len(template) > MAX_CHARS:  # craft-run caps what a template renders at MAX_CHARS: it could never render it
        raise TokenizerSourceError(
            f"{where}: the chat template is {len(template):,} characters, expected at most {MAX_CHARS:,} "
            "(what craft-run renders at most); fix the template or remove it"
        )
    try:
        compile_template(template)
    except ChatTemplateError as e:
        raise TokenizerSourceError(f"{where}: {e}; fix the template or remove it") from None
    return template


@dataclass(frozen=True)
class TokenizerSource:
    tokenizer_json: bytes  # a Hugging Face tokenizer.json, UTF-8
    bos_id: int  # beginning of text; the EOS id where the model has none (GPT-2's convention)
    eos_id: int  # end of text
    pad_id: int  # padding (masked out); EOS when the source names none
    add_bos: bool  # a plain prompt starts with bos_id (the source's add_bos_token / post-processor)
    end_of_turn_ids: tuple[int, ...]  # every id that ends a reply: EOS, end-of-turn, end-of-message
    chat_template: str | None  # Jinja source of the chat template, None when the source has none
    origin: str = "the source"  # the file the tokenizer came from, for messages

    def tokenizer(self, use_library: bool = True) -> HFTokenizer:
        """The tokenizer; TokenizerSourceError naming the origin if it cannot be built (the `tokenizers`
        library refusing its merges, say)."""
        try:
            return HFTokenizer(
                self.tokenizer_json,
                bos_id=self.bos_id,
                eos_id=self.eos_id,
                pad_id=self.pad_id,
                add_bos=self.add_bos,
                use_library=use_library,
            )
        except ValueError as e:
            raise TokenizerSourceError(
                f"{self.origin}: its tokenizer is unusable: {e}; restore the tokenizer from the model's source"
            ) from None


# ---- Hugging Face directory ----


def read_hf_tokenizer(directory: str | Path) -> TokenizerSource:
    """tokenizer.json, tokenizer_config.json (special tokens, add_bos_token, chat_template; or a
    chat_template.jinja beside it; special tokens also from an older special_tokens_map.json) and
    generation_config.json (eos_token_id, maybe a list) - or, where that file is missing, config.json's
    eos / bos ids, from which transformers builds the generation config then."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not regular(path):
        raise TokenizerSourceError(
            f"{directory} has no tokenizer.json; Craft imports fast (tokenizer.json) tokenizers - "
            "save one with transformers' AutoTokenizer.from_pretrained(...).save_pretrained(dir)"
        )
    try:
        raw = read_small(path)
    except OSError as e:
        raise TokenizerSourceError(f"cannot read {path} ({e.strerror}); restore it from the model's source") from None
    spec = load_json(path, raw)
    try:
        check_shape(spec)  # the runtime's own check of what is read below: vocab, added tokens
    except ValueError as e:
        raise TokenizerSourceError(f"{path}: {e}; restore it from the model's source") from None
    config_path, generation_path = directory / "tokenizer_config.json", directory / "generation_config.json"
    config, generation = load_json(config_path), load_json(generation_path)
    if not regular(generation_path):  # transformers' GenerationConfig.from_model_config
        model_config = load_json(directory / "config.json")
        generation_path, generation = (
            directory / "config.json",
            {k: model_config[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id") if k in model_config},
        )
    special_map_path = directory / "special_tokens_map.json"
    special_map = load_json(special_map_path)  # what tokenizer_config.json does not name (an older save)
    ids = spec["model"]["vocab"] | {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
    vocab_size = max(ids.values(), default=-1) + 1

    def token_id(name: str) -> int | None:
        where, token = (
            (config_path, config.get(name))
            if config.get(name) is not None
            else (
                special_map_path,
                special_map.get(name),
            )
        )
        token = token.get("content") if isinstance(token, dict) else token
        if token is None:
            return None
        if not isinstance(token, str):
            raise TokenizerSourceError(
                f"{where}: {name} is {json.dumps(token)[:60]}, expected a token's text or an object "
                "with its 'content'; fix it"
            )
        if token not in ids:
            raise TokenizerSourceError(f"{where}: {name} {token[:60]!r} is not in tokenizer.json's vocabulary")
        return ids[token]

    def generation_id(key: str) -> int | None:
        value = generation.get(key)
        return None if value is None else token_id_field(value, key, generation_path, vocab_size)

    generation_eos = generation.get("eos_token_id")
    generation_eos = [
        token_id_field(i, "eos_token_id", generation_path, vocab_size)
        for i in (generation_eos if isinstance(generation_eos, list) else [generation_eos])
        if i is not None
    ]
    eos = token_id("eos_token")
    eos = eos if eos is not None else (generation_eos[0] if generation_eos else None)
    if eos is None:
        raise TokenizerSourceError(
            f"{directory} names no EOS token (eos_token in tokenizer_config.json or special_tokens_map.json, "
            "eos_token_id in generation_config.json or config.json); add one so generation can stop"
        )
    template_bos = post_processor_bos(spec.get("post_processor"))
    if template_bos is not None:
        template_bos = token_id_field(template_bos, "post_processor's special token id", path, vocab_size)
    bos = first_id(token_id("bos_token"), generation_id("bos_token_id"), template_bos, eos)
    add_bos = config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise TokenizerSourceError(
            f"{config_path}: add_bos_token is {json.dumps(add_bos)[:60]}, expected true or false; fix it"
        )
    add_bos = add_bos if add_bos is not None else template_bos is not None
    pad = first_id(token_id("pad_token"), generation_id("pad_token_id"), eos)
    return TokenizerSource(
        raw,
        bos,
        eos,
        pad,
        add_bos,
        tuple(sorted({eos, *generation_eos})),
        hf_chat_template(directory, config),
        str(path),
    )


def regular(path: Path) -> bool:
    """sources.regular_file with this module's error: False where absent, an error for a FIFO or device."""
    try:
        return regular_file(path)
    except SourceError as e:
        raise TokenizerSourceError(str(e)) from None


def load_json(path: Path, raw: bytes | None = None) -> dict:
    """The JSON object in `path` (or its bytes `raw`, already read); {} where the file is absent."""
    if raw is None and not regular(path):
        return {}
    try:
        value = parse_json(raw if raw is not None else read_small(path), path, "restore it from the model's source")
    except OSError as e:
        raise TokenizerSourceError(f"cannot read {path} ({e.strerror}); restore it from the model's source") from None
    except SourceError as e:
        raise TokenizerSourceError(str(e)) from None
    if not isinstance(value, dict):
        raise TokenizerSourceError(
            f"{path} should hold a JSON object, got {type(value).__name__}; restore it from the model's source"
        )
    return value


def first_id(*candidates: int | None) -> int:
    return next(int(c) for c in candidates if c is not None)


def post_processor_bos(spec: object, depth: int = 0) -> object:
    """The id a TemplateProcessing post-processor puts in front of a single sequence, if any (unchecked:
    the caller range-checks it). A post-processor of another shape puts none."""
    if not isinstance(spec, dict) or depth > 8:  # Sequences nest a level or two in real files
        return None
    if spec.get("type") == "Sequence":
        processors = spec.get("processors")
        processors = processors if isinstance(processors, list) else []
        return next((b for s in processors if (b := post_processor_bos(s, depth + 1)) is not None), None)
    single = spec.get("single")
    if spec.get("type") != "TemplateProcessing" or not isinstance(single, list) or not single:
        return None
    first = single[0].get("SpecialToken") if isinstance(single[0], dict) else None
    specials = spec.get("special_tokens")
    if not isinstance(first, dict) or not isinstance(specials, dict):
        return None
    special = specials.get(first.get("id")) if isinstance(first.get("id"), str) else None
    ids = special.get("ids") if isinstance(special, dict) else None
    return ids[0] if isinstance(ids, list) and ids else None


def hf_chat_template(directory: Path, config: dict) -> str | None:
    """chat_template.jinja, which newer transformers save and which wins over tokenizer_config.json's
    (as in transformers: Craft took the config's first); else tokenizer_config.json's chat_template (a
    string, or named templates: the "default" one, or the only one); else chat_template.json."""
    jinja = directory / "chat_template.jinja"
    if regular(jinja):
        try:
            return checked_template(read_small(jinja).decode("utf-8"), str(jinja))
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerSourceError(f"cannot read {jinja} ({e}); it must be the chat template, UTF-8") from None
    where = directory / "tokenizer_config.json"
    template = config.get("chat_template")
    if isinstance(template, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in template):
            raise TokenizerSourceError(
                f"{where}: chat_template is a list, but not of named templates ({{'name': ..., 'template': ...}}); "
                "fix or remove it"
            )
        named = {t["name"]: t.get("template") for t in template}
        if "default" not in named and len(named) > 1:  # transformers refuses to pick one as well
            raise TokenizerSourceError(
                f"{where}: chat_template holds named templates ({', '.join(sorted(named))[:200]}) but none is "
                "'default'; rename the one to chat with to 'default'"
            )
        template = named.get("default", next(iter(named.values()), None))
    if template is None:
        where = directory / "chat_template.json"
        template = load_json(where).get("chat_template")
    return checked_template(template, str(where))


# ---- GGUF file ----

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


# llama.cpp's pre-tokenizer for "default" (and a file without tokenizer.ggml.pre): four regexes, each
# splitting the pieces of the one before (punctuation runs, GPT-2's regex, digit runs, then threes)
DEFAULT_REGEXES = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)


def split_then_bytes(*regexes: str) -> dict:
    """Each regex splits every piece into its matches and the text between them (llama.cpp's
    unicode_regex_split), then the pieces' bytes become GPT-2's alphabet."""
    return {
        "type": "Sequence",
        "pretokenizers": [
            *({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in regexes),
            dict(BYTE_LEVEL, use_regex=False),
        ],
    }


# tokenizer.ggml.pre -> (normalizer, pre-tokenizer, ignore_merges), as llama.cpp splits for each name
# (llama-vocab.cpp) and as the models' own tokenizer.json files spell it.
DIGITS_THEN_GPT2 = (
    None,
    {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
    False,
)
LLAMA3 = (None, split_then_bytes(LLAMA3_REGEX), True)
QWEN2 = ({"type": "NFC"}, split_then_bytes(QWEN2_REGEX), False)
GPT2 = (None, BYTE_LEVEL, False)
GGUF_PRE = {
    "default": (None, split_then_bytes(*DEFAULT_REGEXES), False),
    "gpt2": GPT2,
    "gpt-2": GPT2,
    "mpt": GPT2,
    "olmo": GPT2,
    "phi-2": GPT2,
    "smollm": DIGITS_THEN_GPT2,
    "starcoder": DIGITS_THEN_GPT2,
    "refact": DIGITS_THEN_GPT2,
    "command-r": DIGITS_THEN_GPT2,
    "codeshell": DIGITS_THEN_GPT2,
    "llama3": LLAMA3,
    "llama-v3": LLAMA3,
    "llama-bpe": LLAMA3,
    "falcon3": LLAMA3,
    "smaug-bpe": LLAMA3,
    "dbrx": LLAMA3,
    "qwen2": QWEN2,
    "deepseek-r1-qwen": QWEN2,
    "megrez": QWEN2,
    "pixtral": LLAMA3,  # llama.cpp splits its text with the Llama-3 regex
}
# The pre-tokenizers for which llama.cpp starts a prompt with BOS when the file has no add_bos_token.
GGUF_PRE_ADDING_BOS = {"llama3", "llama-v3", "llama-bpe", "falcon3"}
# Tokens that llama.cpp treats as end of generation by their text (llama-vocab.cpp), whatever their type.
END_OF_TURN_TEXTS = {
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<|end_of_text|>",  # Llama-3's EOS, where a file's eos is <|eot_id|>
    "<|return|>",
    "<|call|>",
    "<EOT>",
    "_<EOT>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
    "<end_of_utterance>",
}
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4  # tokenizer.ggml.token_type values


def read_gguf_tokenizer(source) -> TokenizerSource:
    """The tokenizer of a GGUF file (a path or a gguf.GGUFReader already open on it)."""
    from gguf import GGUFReader

    reader = source if isinstance(source, GGUFReader) else GGUFReader(str(source))
    name = str(source) if not isinstance(source, GGUFReader) else str(reader.data.filename)

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return gguf_field(f, key, name) if f is not None else default

    def token_id(key: str) -> int | None:
        value = field(f"tokenizer.ggml.{key}")
        return None if value is None else token_id_field(value, f"tokenizer.ggml.{key}", name, len(tokens))

    def flag(key: str, default: bool) -> bool:
        value = field(f"tokenizer.ggml.{key}", default)
        if not isinstance(value, bool):
            raise TokenizerSourceError(f"{name}: tokenizer.ggml.{key} is {value!r:.60}, expected a bool")
        return value

    model = field("tokenizer.ggml.model")
    tokens = field("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise TokenizerSourceError(
            f"{name} has no tokenizer (tokenizer.ggml.model / tokens); convert the model with a "
            "llama.cpp that writes them"
        )
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise TokenizerSourceError(f"{name}: tokenizer.ggml.tokens is not a list of strings; convert the model again")
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens) or not all(type(k) is int for k in types):
        raise TokenizerSourceError(
            f"{name}: tokenizer.ggml.token_type is not {len(tokens)} integers, one per token; convert the model again"
        )
    merges, scores = field("tokenizer.ggml.merges"), field("tokenizer.ggml.scores")
    if merges is not None and (not isinstance(merges, list) or not all(isinstance(m, str) for m in merges)):
        raise TokenizerSourceError(f"{name}: tokenizer.ggml.merges is not a list of strings; convert the model again")
    if scores is not None and (
        not isinstance(scores, list)
        or len(scores) != len(tokens)
        or not all(type(x) in (int, float) and math.isfinite(x) for x in scores)
    ):
        raise TokenizerSourceError(
            f"{name}: tokenizer.ggml.scores is not {len(tokens)} finite numbers, one per token; convert the model again"
        )
    eos, bos = token_id("eos_token_id"), token_id("bos_token_id")
    if model == "llama" and len(tokens) > 2:  # llama.cpp's sentencepiece defaults: <s> 1, </s> 2
        eos, bos = 2 if eos is None else eos, 1 if bos is None else bos
    if eos is None:
        raise TokenizerSourceError(
            f"{name} has no tokenizer.ggml.eos_token_id; generation could never stop - set it with gguf-new-metadata"
        )
    if model == "gpt2":
        pre = field("tokenizer.ggml.pre", "default")
        if not isinstance(pre, str) or pre not in GGUF_PRE:
            raise TokenizerSourceError(
                f"{name}: tokenizer.ggml.pre '{pre!s:.60}' is not supported; supported: {', '.join(sorted(GGUF_PRE))}"
            )
        spec = byte_level_json(tokens, types, merges or [], GGUF_PRE[pre])
        add_bos = flag("add_bos_token", pre in GGUF_PRE_ADDING_BOS)
    elif model == "llama":
        unk = token_id("unknown_token_id")
        try:
            spec = sentencepiece_json(
                tokens, types, scores, merges, tokens[unk] if unk is not None else None, flag("add_space_prefix", True)
            )
        except TokenizerSourceError as e:  # its own lines do not know the file
            raise TokenizerSourceError(f"{name}: {e}") from None
        add_bos = flag("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    else:
        raise TokenizerSourceError(
            f"{name}: tokenizer.ggml.model '{model}' is not supported; "
            "expected 'gpt2' (byte-level BPE) or 'llama' (sentencepiece BPE)"
        )
    bos = bos if bos is not None else eos
    if add_bos:
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}},
        }
    turn_ends = {eos} | {i for key in ("eot_token_id", "eom_token_id") if (i := token_id(key)) is not None}
    # by their text, whatever their type: llama.cpp overrides a user-defined <|im_end|>'s type and stops there
    turn_ends |= {i for i, t in enumerate(tokens) if t in END_OF_TURN_TEXTS}
    pad = token_id("padding_token_id")
    return TokenizerSource(
        json.dumps(spec, ensure_ascii=False).encode("utf-8"),
        bos,
        eos,
        pad if pad is not None else eos,
        add_bos,
        tuple(sorted(turn_ends)),
        checked_template(field("tokenizer.chat_template"), f"{name}: tokenizer.chat_template"),
        name,
    )


def added_tokens(tokens: list[str], types: list[int], keep=lambda token: True) -> list[dict]:
    """Control and unknown tokens as special added tokens, user-defined ones as plain added tokens:
    text spelling them becomes their id, as in llama.cpp."""
    return [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": k != USER_DEFINED,
        }
        for i, (t, k) in enumerate(zip(tokens, types))
        if k in (UNKNOWN, CONTROL, USER_DEFINED) and keep(t)
    ]


def byte_level_json(tokens: list[str], types: list[int], merges: list[str], pre: tuple) -> dict:
    normalizer, pre_tokenizer, ignore_merges = pre
    alphabet = set(BYTE_CHAR.values())
    # An added token (control, user-defined) keeps its own text, which llama.cpp matches, in the vocabulary
    # too: the tokenizers library gives an added token whose text is not there a new id past the vocabulary.
    # Any other token outside GPT-2's alphabet is respelled in it, as transformers does.
    special = {UNKNOWN, CONTROL, USER_DEFINED}
    vocab = {
        t if set(t) <= alphabet or k in special else "".join(BYTE_CHAR[b] for b in t.encode("utf-8")): i
        for i, (t, k) in enumerate(zip(tokens, types))
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        # in their own text, which llama.cpp matches (DeepSeek's <｜User｜> spelled out as 12 byte tokens before)
        "added_tokens": added_tokens(tokens, types),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": list(merges),
        },
    }


def sentencepiece_json(
    tokens: list[str],
    types: list[int],
    scores: list[float] | None,
    merges: list[str] | None,
    unk: str | None,
    add_space_prefix: bool,
) -> dict:
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is None:
        if scores is None:
            raise TokenizerSourceError("a 'llama' GGUF vocabulary needs tokenizer.ggml.scores or tokenizer.ggml.merges")
        if sum(len(t) ** 2 for t in tokens) > MAX_SPLIT_WORK:  # merges_from_scores tries every split of every token
            raise TokenizerSourceError(
                f"a 'llama' GGUF vocabulary with tokens of up to {max(map(len, tokens)):,} characters is not a "
                "sentencepiece vocabulary (its tokens are a few to a few dozen characters); convert the model again"
            )
        merges = [f"{a} {b}" for a, b in merges_from_scores(vocab, dict(zip(tokens, scores)))]
    decoders = [
        {"type": "Replace", "pattern": {"String": META_SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    # sentencepiece (and llama.cpp) put "\u2581" in front of the text and after every special token, even before a
    # space: Llama 2's own tokenizer.json spells that as this normalizer. (transformers' GGUF loader uses
    # Metaspace instead, which skips the prefix when the text starts with a space: not what the model was trained on.)
    space = [{"type": "Prepend", "prepend": META_SPACE}] if add_space_prefix else []
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens(tokens, types),
        "normalizer": {
            "type": "Sequence",
            "normalizers": space + [{"type": "Replace", "pattern": {"String": " "}, "content": META_SPACE}],
        },
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [m.split(" ") if isinstance(m, str) else m for m in merges],
        },
    }


MAX_SPLIT_WORK = 50_000_000  # sum of squared token lengths: a 32k vocabulary of real tokens is ~2M


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best-scored result first: sentencepiece's BPE merges
    the pair whose result scores highest (transformers' generate_merges, the same order)."""
    merges = []
    for piece, score in scores.items():
        local = [
            (piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
