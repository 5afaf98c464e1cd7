"""Tokenizers shared by training and the runtime: `char` and `sentencepiece`, both byte-exact, and
(in bpe_tokenizer.py) Hugging Face `tokenizer.json` BPE tokenizers of imported models.

Both map any UTF-8 text to ids and back without loss: characters (or pieces) outside the
vocabulary fall back to one token per UTF-8 byte. Both serialize to bytes (`to_bytes`) that
the run directory stores and the .onnx file carries in its metadata, and both expose
`token_bytes(id)` so the runtime can stream text token by token (see TextStream).

Standard library + sentencepiece only: the runtime imports this file.
"""

from __future__ import annotations

import codecs
import json
from typing import Iterable, Protocol

CHAR = "char"
SENTENCEPIECE = "sentencepiece"
HF_JSON = "tokenizer.json"  # a Hugging Face tokenizer.json (craft.runtime.bpe_tokenizer.HFTokenizer)
KINDS = (CHAR, SENTENCEPIECE, HF_JSON)
META_SPACE = "\u2581"  # sentencepiece's stand-in for " " inside pieces


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    add_bos: bool  # a plain prompt starts with bos_id (encode never adds it)

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...
    def to_bytes(self) -> bytes: ...


class CharTokenizer:
    """One token per known character; unknown characters become their UTF-8 bytes.

    ids: 0 = BOS, 1 = EOS, 2..257 = bytes 0x00..0xFF, 258.. = the vocabulary's characters.
    """

    kind = CHAR
    bos_id, eos_id, pad_id = 0, 1, 1  # padding is masked out, so it can reuse EOS
    add_bos = True
    BYTE_OFFSET = 2
    CHAR_OFFSET = 258

    def __init__(self, chars: str):
        self._ids = dict(zip(chars, range(self.CHAR_OFFSET, self.CHAR_OFFSET + len(chars))))
        if len(self._ids) != len(chars):
            raise ValueError("char vocabulary has repeated characters")
        chars.encode("utf-8")  # a lone surrogate: ValueError here, at load, not mid-stream
        self.chars = chars
        self.vocab_size = self.CHAR_OFFSET + len(chars)

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        out: list[int] = []
        for c in text:
            i = ids.get(c)
            if i is not None:
                out.append(i)
            else:
                out.extend(b + self.BYTE_OFFSET for b in c.encode("utf-8", "surrogatepass"))
        return out

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token_id stands for; b"" for specials and for ids past the vocabulary
        (a model's embedding may be padded beyond its tokenizer)."""
        if self.CHAR_OFFSET <= token_id < self.vocab_size:
            return self.chars[token_id - self.CHAR_OFFSET].encode("utf-8")
        if self.BYTE_OFFSET <= token_id < self.CHAR_OFFSET:
            return bytes([token_id - self.BYTE_OFFSET])
        return b""

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", "replace")

    def to_bytes(self) -> bytes:
        return json.dumps({"kind": CHAR, "chars": self.chars}, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> "CharTokenizer":
        spec = json.loads(data.decode("utf-8"))
        if not isinstance(spec, dict) or spec.get("kind") != CHAR or not isinstance(spec.get("chars"), str):
            raise ValueError("not a char tokenizer: expected JSON with kind='char' and a 'chars' string")
        return cls(spec["chars"])


class SentencePieceTokenizer:
    """A sentencepiece model trained with byte fallback and identity normalization (exact round trip)."""

    kind = SENTENCEPIECE
    add_bos = True

    def __init__(self, model_bytes: bytes):
        import sentencepiece as spm

        if not model_bytes:  # sentencepiece takes empty bytes as a model, then fails at encode
            raise ValueError("malformed sentencepiece tokenizer: it is empty")
        self.model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]

    def _piece_bytes(self, i: int) -> bytes:
        sp = self.sp
        if sp.is_control(i) or sp.is_unknown(i):
            return b""
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):  # "<0xAB>"
            return bytes([int(piece[3:5], 16)])
        return piece.replace(META_SPACE, " ").encode("utf-8")

    def encode(self, text: str) -> list[int]:
        if META_SPACE not in text:
            return self.sp.encode(text)
        # sentencepiece writes spaces as U+2581 and so cannot tell a real U+2581 from a space:
        # spell real ones out as their three byte tokens.
        meta = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META_SPACE.encode("utf-8")]
        out: list[int] = []
        for i, part in enumerate(text.split(META_SPACE)):
            if i:
                out.extend(meta)
            if part:
                out.extend(self.sp.encode(part))
        return out

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", "replace")

    def to_bytes(self) -> bytes:
        return self.model_bytes


def tokenizer_from_bytes(kind: str, data: bytes) -> Tokenizer:
    """Rebuild a tokenizer from what `to_bytes` wrote; ValueError for an unknown kind or data that
    does not make one (it comes from a file: any shape of JSON can arrive)."""
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind '{kind}'; expected one of {', '.join(repr(k) for k in KINDS)}")
    try:
        if kind == CHAR:
            return CharTokenizer.from_bytes(data)
        if kind == SENTENCEPIECE:
            return SentencePieceTokenizer(data)
        from craft.runtime.bpe_tokenizer import HFTokenizer

        return HFTokenizer.from_bytes(data)
    except (TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError) as e:  # unforeseen shapes
        raise ValueError(f"malformed {kind} tokenizer ({type(e).__name__}: {str(e)[:200]})") from None


class TextStream:
    """Turns a stream of token ids into text, never splitting a multi-byte UTF-8 character.

    feed(id) returns the text completed by that token (possibly ""); bytes of a character
    split across tokens are held until the character is whole. finish() flushes the rest
    (an incomplete character at the very end becomes U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)
