"""Hugging Face tokenizer.json tokenizers: byte-level BPE (GPT-2, SmolLM2, Qwen2, Llama-3) and
sentencepiece-style BPE (Llama 2, TinyLlama, Mistral: "\u2581" for spaces, <0xNN> byte fallback).

Encoding runs in the `tokenizers` library when it is installed (it has wheels for x86_64,
aarch64 and armv7l); elsewhere (armv6l, or a venv without it) in the pure-Python pipeline here
and in bpe_pretokenizer.py, which gives the same ids: added tokens are cut out first, then the
normalizer, the pre-tokenizer and the BPE merges run exactly as the library's do.

`encode` adds no special tokens; `add_bos` says whether the model expects BOS in front of a plain
prompt (the source's post-processor / add_bos_token flag), for the caller to act on. Special
tokens written in the text (<|im_start|>) become their ids, as in Hugging Face's tokenizers.

`token_bytes(id)` is the exact bytes of a token (byte-level: GPT-2's char map inverted;
sentencepiece-style: "\u2581" -> " ", <0xNN> -> that byte; special tokens: b""), so TextStream
streams UTF-8 safely. The .onnx file stores `to_bytes()`: a JSON envelope holding the
tokenizer.json object itself plus the special ids.

Standard library (+ optional `tokenizers`): the runtime imports this file.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import re
from typing import Callable, Iterable, Iterator

from craft.runtime import bpe_pretokenizer as pre
from craft.runtime.tokenizer import HF_JSON, META_SPACE

CACHE_WORDS = 50_000  # BPE results kept per tokenizer; a word repeats often in running text
CACHE_WORD_CHARS = 64  # longer words are not kept: 500,000-character ones grew a long-lived process by 16 MB each


class BPEModel:
    """The "BPE" model of a tokenizer.json: vocabulary, ranked merges, byte fallback, unknown token."""

    def __init__(self, spec: dict):
        if spec.get("type") != "BPE":
            raise pre.UnsupportedTokenizer(f"tokenizer model {spec.get('type')!r} is not supported; expected 'BPE'")
        if spec.get("continuing_subword_prefix") or spec.get("end_of_word_suffix") or spec.get("dropout"):
            raise pre.UnsupportedTokenizer(
                "BPE with continuing_subword_prefix, end_of_word_suffix or dropout is not supported"
            )
        self.vocab: dict[str, int] = spec["vocab"]
        self.byte_fallback = bool(spec.get("byte_fallback", False))
        self.ignore_merges = bool(spec.get("ignore_merges", False))
        self.fuse_unk = bool(spec.get("fuse_unk", False))
        unk = spec.get("unk_token")
        self.unk_id = self.vocab.get(unk) if unk is not None else None
        self.merges: dict[tuple[int, int], tuple[int, int]] = {}  # (left id, right id) -> (rank, merged id)
        for rank, merge in enumerate(spec.get("merges") or []):
            try:
                left, right = merge.split(" ") if isinstance(merge, str) else merge
                self.merges[(self.vocab[left], self.vocab[right])] = (rank, self.vocab[left + right])
            except (ValueError, TypeError, KeyError):
                raise ValueError(
                    f"tokenizer.json's merge {rank} ({str(merge)[:40]!r}) is not two tokens of the vocabulary"
                ) from None
        self._cache: dict[str, list[int]] = {}

    def tokenize(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = self._tokenize(word)
            if len(self._cache) < CACHE_WORDS and len(word) <= CACHE_WORD_CHARS:
                self._cache[word] = ids
        return ids

    def _tokenize(self, word: str) -> list[int]:
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        ids: list[int] = []
        unk_open = False  # the last id is an unknown token that a following unknown fuses into
        for c in word:
            i = self.vocab.get(c)
            if i is not None:
                ids.append(i)
                unk_open = False
                continue
            if self.byte_fallback:
                fallback = [self.vocab.get(f"<0x{b:02X}>") for b in c.encode("utf-8", "surrogatepass")]
                if None not in fallback:
                    ids.extend(fallback)
                    unk_open = False
                    continue
            if self.unk_id is not None and not (unk_open and self.fuse_unk):
                ids.append(self.unk_id)
                unk_open = True
        return self.merge(ids)

    def merge(self, ids: list[int]) -> list[int]:
        """Apply merges lowest rank first, leftmost first among equals (the library's Word::merge_all)."""
        merges, n = self.merges, len(ids)
        if n < 2:
            return ids
        sym: list[int | None] = list(ids)
        prev, nxt = list(range(-1, n - 1)), list(range(1, n + 1))
        nxt[-1] = -1
        heap = [(m[0], pos, m[1]) for pos in range(n - 1) if (m := merges.get((ids[pos], ids[pos + 1])))]
        heapq.heapify(heap)
        while heap:
            _, pos, new_id = heapq.heappop(heap)
            right = nxt[pos]
            if sym[pos] is None or right == -1:
                continue
            current = merges.get((sym[pos], sym[right]))
            if current is None or current[1] != new_id:  # a stale entry
                continue
            sym[pos], sym[right] = new_id, None
            nxt[pos] = nxt[right]
            if nxt[pos] != -1:
                prev[nxt[pos]] = pos
            if prev[pos] != -1 and (m := merges.get((sym[prev[pos]], new_id))):
                heapq.heappush(heap, (m[0], prev[pos], m[1]))
            if nxt[pos] != -1 and (m := merges.get((new_id, sym[nxt[pos]]))):
                heapq.heappush(heap, (m[0], pos, m[1]))
        return [s for s in sym if s is not None]


class AddedTokens:
    """Cuts added tokens (<|im_start|>, <s>, ...) out of the text before the normalizer and BPE see it:
    leftmost-longest matches, first of the tokens marked normalized=false on the raw text, then of
    the others on the normalized text (the library's AddedVocabulary::extract_and_normalize)."""

    def __init__(self, specs: list[dict], normalize):
        self.tokens = {t["id"]: t for t in specs}
        self.normalize = normalize
        raw = {t["content"]: t["id"] for t in specs if not t.get("normalized", False) and t["content"]}
        normed = {normalize(t["content"]): t["id"] for t in specs if t.get("normalized", False) and t["content"]}
        self.raw, self.normed = self._matcher(raw), self._matcher(normed)

    @staticmethod
    def _matcher(contents: dict[str, int]) -> tuple[re.Pattern, dict[str, int]] | None:
        if not contents:
            return None
        alternatives = sorted(contents, key=len, reverse=True)  # longest first: leftmost-longest
        return re.compile("|".join(re.escape(c) for c in alternatives)), contents

    def split(self, text: str) -> list[tuple[str, int | None, bool]]:
        """(text, None, at_start) stretches for BPE (normalized) and ("", id, False) for added tokens."""
        out: list[tuple[str, int | None, bool]] = []
        for segment, token_id, start in self._find(text, self.raw):
            if token_id is not None:
                out.append(("", token_id, False))
                continue
            for sub, sub_id, sub_start in self._find(self.normalize(segment), self.normed):
                out.append((sub, sub_id, start == 0 and sub_start == 0 and sub_id is None))
        return out

    def _find(self, text: str, matcher) -> list[tuple[str, int | None, int]]:
        if matcher is None or not text:
            return [(text, None, 0)] if text else []
        pattern, ids = matcher
        pieces: list[tuple[str, int | None, int]] = []
        done = 0
        for m in pattern.finditer(text):
            start, stop = m.span()
            token = self.tokens[ids[m.group()]]
            if token.get("single_word", False):
                before_word = start > 0 and re.match(r"\w", text[start - 1])
                after_word = stop < len(text) and re.match(r"\w", text[stop])
                if before_word or after_word:
                    continue
            # the whitespace beside the token, walked in place: text[:start].rstrip() copied the text
            # before every match, quadratic in a prompt full of such tokens
            if token.get("lstrip", False):
                while start > done and text[start - 1] in pre.WHITE_SPACE_CHARS:
                    start -= 1
            if token.get("rstrip", False):
                while stop < len(text) and text[stop] in pre.WHITE_SPACE_CHARS:
                    stop += 1
            if done < start:
                pieces.append((text[done:start], None, done))
            pieces.append(("", token["id"], start))
            done = stop
        if done < len(text):
            pieces.append((text[done:], None, done))
        return pieces


class HFTokenizer:
    """A tokenizer.json tokenizer with the Tokenizer protocol of craft.runtime.tokenizer."""

    kind = HF_JSON

    def __init__(
        self,
        tokenizer_json: str | bytes | dict,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        add_bos: bool,
        use_library: bool = True,
    ):
        """tokenizer_json: the text of a tokenizer.json or the object it holds. use_library=False forces
        the pure-Python pipeline even where `tokenizers` is installed (tests)."""
        if isinstance(tokenizer_json, dict):
            spec, self.json = tokenizer_json, json.dumps(tokenizer_json, ensure_ascii=False)
        else:
            self.json = tokenizer_json.decode("utf-8") if isinstance(tokenizer_json, bytes) else tokenizer_json
            spec = json.loads(self.json)
        check_shape(spec)
        self.bos_id, self.eos_id, self.pad_id, self.add_bos = int(bos_id), int(eos_id), int(pad_id), bool(add_bos)
        model, added = spec["model"], spec.get("added_tokens") or []
        pieces = {i: t for t, i in model["vocab"].items()} | {t["id"]: t["content"] for t in added}
        self.vocab_size = max(pieces, default=-1) + 1
        self._pieces, self._token_ids = pieces, {t: i for i, t in pieces.items()}
        self._special = {t["id"] for t in added if t.get("special", False)}
        self._piece_bytes, self.strips_leading_space = piece_decoder(spec.get("decoder"))
        self._bytes: dict[int, bytes] = {}  # filled as tokens are streamed: a table of 49k pieces costs 0.1 s at start
        self.backend = "python"
        self._library = load_library(self.json) if use_library else None
        if self._library is not None:
            self.backend = "tokenizers"
        else:
            normalize = pre.normalizer(spec.get("normalizer"))
            self._pre_tokenize = pre.pre_tokenizer(spec.get("pre_tokenizer"))
            self._added = AddedTokens(added, normalize)
            self._model = BPEModel(model)

    def encode(self, text: str) -> list[int]:
        """ValueError for text that is not Unicode (a lone surrogate) or that the library gives up on
        (a regex past its backtracking limit)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the text is not valid Unicode (a lone surrogate at offset {e.start})") from None
        if self._library is not None:
            try:
                with panics_unprinted():
                    return self._library.encode(text, add_special_tokens=False).ids
            except BaseException as e:  # a Rust panic is a BaseException
                if not (isinstance(e, Exception) or is_panic(e)):
                    raise
                raise ValueError(f"the tokenizer failed on this text ({one_line(e)})") from None
        ids: list[int] = []
        for stretch, token_id, at_start in self._added.split(text):
            if token_id is not None:
                ids.append(token_id)
                continue
            for word, _ in self._pre_tokenize([(stretch, at_start)]):
                ids.extend(self._model.tokenize(word))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token_id stands for; b"" for special tokens and ids past the vocabulary."""
        piece = self._bytes.get(token_id)
        if piece is None:
            text = self._pieces.get(token_id)
            piece = b"" if text is None or token_id in self._special else self._piece_bytes(text)
            if text is not None:  # ids past the vocabulary are not kept: a hostile id cannot grow the dict
                self._bytes[token_id] = piece
        return piece

    def token_to_id(self, token: str) -> int | None:
        return self._token_ids.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token as the vocabulary writes it ("<|im_end|>"): how chat templates spell special tokens."""
        return self._pieces.get(token_id)

    def decode(self, ids: Iterable[int]) -> str:
        """Hugging Face's decode(skip_special_tokens=True), including its removal of the space that a
        sentencepiece-style tokenizer put in front of the text."""
        text = b"".join(self.token_bytes(i) for i in ids).decode("utf-8", "replace")
        return text[1:] if self.strips_leading_space and text.startswith(" ") else text

    def to_bytes(self) -> bytes:
        envelope = {
            "kind": HF_JSON,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "add_bos": self.add_bos,
            "tokenizer": json.loads(self.json),
        }
        return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, use_library: bool = True) -> "HFTokenizer":
        try:
            envelope = json.loads(data.decode("utf-8"))
            if envelope.get("kind") != HF_JSON or not isinstance(envelope.get("tokenizer"), dict):
                raise ValueError
            ids = {k: envelope[k] for k in ("bos_id", "eos_id", "pad_id")}
            if not all(type(i) is int for i in ids.values()):  # int(1e400) raised OverflowError; int(2.7) is 2
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise ValueError(
                f"not a {HF_JSON} tokenizer: expected JSON with kind='{HF_JSON}', the special ids "
                "and a 'tokenizer' object"
            ) from None
        return cls(
            envelope["tokenizer"],
            add_bos=bool(envelope.get("add_bos", False)),
            use_library=use_library,
            **ids,
        )


def load_library(tokenizer_json: str):
    """The `tokenizers` library's Tokenizer for this JSON, or None where the library is not installed;
    ValueError if the library refuses the JSON."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        with panics_unprinted():
            library = Tokenizer.from_str(tokenizer_json)
            # A prompt is encoded as it is, as transformers encodes one: the JSON's padding (to a length it
            # names: 10^8 ids allocated, or an id outside the model) and truncation (a prompt cut) are off.
            library.no_padding()
            library.no_truncation()
            return library
    except BaseException as e:  # it raises a bare Exception, or panics (a BaseException) on some inputs
        if not (isinstance(e, Exception) or is_panic(e)):
            raise
        raise ValueError(f"the tokenizers library refuses it ({one_line(e)})") from None


@contextlib.contextmanager
def panics_unprinted() -> Iterator[None]:
    """stderr (fd 2) pointed at /dev/null for one library call: a Rust panic prints its message (with
    RUST_BACKTRACE set, a stack too) before Python sees it as an exception, which the caller turns
    into its one line. The library prints nothing otherwise."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to protect
        saved = None
    if saved is None:
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def is_panic(e: BaseException) -> bool:
    """A Rust panic inside the `tokenizers` library (pyo3_runtime.PanicException, not importable)."""
    return type(e).__name__ == "PanicException"


def one_line(e: BaseException, limit: int = 200) -> str:
    return " ".join(str(e).split())[:limit]


MAX_INSERTED_TEXT = 16  # characters a Replace / Prepend normalizer may write ("▁" for " " in real ones)
MAX_PIECE_CHARS = 8_000  # a token's characters (real vocabularies: a few hundred at most, runs of spaces or dashes)
MAX_PATTERN_CHARS = 4_000  # a Split regex (GPT-4o's, the longest in use, is ~400); loading one here is not linear


def check_shape(spec) -> None:
    """ValueError unless `spec` has a tokenizer.json's shape where this file reads it: the model's
    vocabulary (token -> id) and the added tokens (content, id). Ids must be ints >= 0, no token
    longer than MAX_PIECE_CHARS, and the normalizer and pre-tokenizer steps bounded (text_growth):
    a hostile file must not turn a short prompt into gigabytes, in the library or here."""

    def is_id(value) -> bool:
        return type(value) is int and value >= 0

    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise ValueError("tokenizer.json needs a 'model' object with a 'vocab' object")
    if not all(is_id(i) for i in model["vocab"].values()):
        raise ValueError("tokenizer.json's model.vocab must map each token to an id >= 0")
    added = spec.get("added_tokens") or []
    if not isinstance(added, list) or not all(
        isinstance(t, dict) and isinstance(t.get("content"), str) and is_id(t.get("id")) for t in added
    ):
        raise ValueError("tokenizer.json's added_tokens must be objects with a 'content' string and an 'id' >= 0")
    longest = max((len(t) for t in model["vocab"]), default=0)
    longest = max([longest, *(len(t["content"]) for t in added)])
    if longest > MAX_PIECE_CHARS:  # each would print that much per generated token
        raise ValueError(
            f"tokenizer.json has a token of {longest:,} characters, more than the {MAX_PIECE_CHARS:,} any real "
            "vocabulary holds; the file is damaged"
        )
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        if spec.get(key) is not None and not isinstance(spec[key], dict):
            raise ValueError(f"tokenizer.json's '{key}' must be an object or null")
    growth = text_growth(spec.get("normalizer"), "normalizers") * text_growth(
        spec.get("pre_tokenizer"), "pretokenizers"
    )
    if growth > MAX_TEXT_GROWTH:
        raise ValueError(
            f"tokenizer.json's normalizer and pre-tokenizer steps can make a text {growth:,.0f} times longer, more "
            f"than the {MAX_TEXT_GROWTH} any real tokenizer reaches (a prompt of 100 characters became gigabytes); "
            "the file is damaged or hostile"
        )


# NFKC (18x at most), Lowercase (3x) and ByteLevel (4x) are 216x together; 6 chained ByteLevels or
# Replace a -> a*16 three times pass it (the bound multiplies each step's worst case)
MAX_TEXT_GROWTH = 1024
MAX_TOKENIZER_STEPS = 32  # normalizer and pre-tokenizer steps; real ones have 1-5

# How many times longer one step can make a text, at most: Unicode's longest NFKC / NFD expansion,
# a character's UTF-8 bytes as ByteLevel characters, a lowercase that writes two ("İ")
STEP_GROWTH = {"NFKC": 18, "NFKD": 18, "NFC": 3, "NFD": 4, "ByteLevel": 4, "Lowercase": 3}


def text_growth(step, children: str) -> float:
    """The factor by which `step` (a normalizer or pre-tokenizer tree, Sequences nested under
    `children`) can lengthen a text, at most; ValueError past MAX_TOKENIZER_STEPS steps or for a
    Replace / Prepend / Metaspace writing more than MAX_INSERTED_TEXT characters in one place."""
    growth, stack, count = 1.0, [step], 0
    while stack:
        step = stack.pop()
        if not isinstance(step, dict):
            continue
        count += 1
        if count > MAX_TOKENIZER_STEPS:
            raise ValueError(f"tokenizer.json has more than {MAX_TOKENIZER_STEPS} {children}; the file is damaged")
        nested = step.get(children)  # a Sequence's steps
        stack.extend(nested if isinstance(nested, list) else [])
        kind = step.get("type")
        inserted = {"Replace": "content", "Prepend": "prepend", "Metaspace": "replacement"}.get(kind)
        text = step.get(inserted) if inserted else None
        if isinstance(text, str) and len(text) > MAX_INSERTED_TEXT:
            raise ValueError(
                f"tokenizer.json's {kind} step inserts {len(text):,} characters, more than "
                f"the {MAX_INSERTED_TEXT} any real tokenizer needs; the file is damaged"
            )
        pattern = step.get("pattern")
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if isinstance(regex, str) and len(regex) > MAX_PATTERN_CHARS:
            raise ValueError(
                f"tokenizer.json's {kind} step has a pattern of {len(regex):,} characters, more than the "
                f"{MAX_PATTERN_CHARS:,} any real tokenizer needs; the file is damaged"
            )
        if kind == "Replace" and isinstance(text, str):
            literal = pattern.get("String") if isinstance(pattern, dict) else None
            # a literal of n characters becomes the content; a regex may match the empty string between any two
            growth *= max(1.0, len(text) / len(literal)) if isinstance(literal, str) and literal else 1 + len(text)
        elif kind == "Metaspace" and isinstance(text, str):
            growth *= max(1, len(text))
        else:
            growth *= STEP_GROWTH.get(kind, 1)
    return growth


def piece_decoder(decoder: dict | None) -> tuple[Callable[[str], bytes], bool]:
    """How `decoder` turns one vocabulary piece into its exact bytes, and whether decode drops one
    leading space."""
    steps = (
        decoder.get("decoders", []) if decoder and decoder.get("type") == "Sequence" else [decoder] if decoder else []
    )
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise ValueError("tokenizer.json's decoder steps must be objects")
    kinds = [s.get("type") for s in steps]
    byte_level = "ByteLevel" in kinds
    metaspace = any(
        s.get("type") == "Metaspace"
        or (s.get("type") == "Replace" and s.get("content") == " " and s.get("pattern") == {"String": META_SPACE})
        for s in steps
    )
    byte_fallback = "ByteFallback" in kinds
    strip_space = any(
        s.get("type") == "Strip" and s.get("content") == " " and type(s.get("start")) is int and s["start"] > 0
        for s in steps
    ) or any(
        s.get("type") == "Metaspace"
        and s.get("prepend_scheme", "always") != "never"
        and s.get("add_prefix_space", True)
        for s in steps
    )

    def piece_bytes(piece: str) -> bytes:
        # Called mid-stream, so nothing here may raise: a lone surrogate in a hostile vocabulary
        # becomes bytes that the stream decodes as U+FFFD.
        if byte_level:
            try:
                return bytes(pre.CHAR_BYTE[c] for c in piece)
            except KeyError:  # not written in GPT-2's alphabet (an added token): as the library, its UTF-8
                return piece.encode("utf-8", "surrogatepass")
        if byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") and is_hex(piece[3:5]):
            return bytes([int(piece[3:5], 16)])
        return (piece.replace(META_SPACE, " ") if metaspace else piece).encode("utf-8", "surrogatepass")

    return piece_bytes, strip_space


def is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)
