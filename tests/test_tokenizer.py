"""Tokenizers: exact round trip on any UTF-8 text, serialization, and UTF-8-safe streaming."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from craft.config import load_config
from craft.data import Corpus, train_tokenizer
from craft.runtime.tokenizer import CharTokenizer, SentencePieceTokenizer, TextStream, tokenizer_from_bytes

# Valid Unicode scalar values (no lone surrogates: those are not UTF-8), control characters included.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
FIXED = [
    "",
    " ",
    "  leading and trailing  ",
    "\n\n\t\r\x00\x07\x1b[0m",
    "tab\there",
    "naïve café — “quotes”",
    "日本語のテキスト、中文文本。한국어",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "zero\u200bwidth\ufeffBOM",
    "math ∑∫√∞ ≤ ≥",
    "combining e\u0301 vs é",
    "\U0010ffff\U0001f600",
    "KING RICHARD III:\nNow is the winter",
]


@pytest.fixture(scope="module")
def sp(small_corpus) -> SentencePieceTokenizer:
    return train_tokenizer(load_config("tiny", ["tokenizer.vocab_size=400"]), Corpus(str(small_corpus)))


@pytest.fixture(scope="module")
def char(small_corpus) -> CharTokenizer:
    return train_tokenizer(load_config("tiny", ["tokenizer.kind=char"]), Corpus(str(small_corpus)))


@pytest.mark.parametrize("text", FIXED)
def test_fixed_round_trip(sp, char, text):
    for tok in (sp, char):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_property_round_trip(sp, char, text):
    assert sp.decode(sp.encode(text)) == text
    assert char.decode(char.encode(text)) == text


def test_sentencepiece_uses_subwords_and_byte_fallback(sp):
    common = sp.encode("the king and the queen")
    assert len(common) < len("the king and the queen")  # merges, not characters
    ids = sp.encode("🙂")
    assert len(ids) == 4 and all(sp.sp.is_byte(i) for i in ids)  # 4 UTF-8 bytes, no <unk>
    assert sp.vocab_size == 400 and sp.bos_id != sp.eos_id


def test_char_tokenizer_known_and_unknown_characters(char):
    assert len(char.encode("ROMEO")) == 5
    assert len(char.encode("語")) == 3  # not in Shakespeare: its three UTF-8 bytes
    assert char.vocab_size == CharTokenizer.CHAR_OFFSET + len(char.chars)


@pytest.mark.parametrize("which", ["sp", "char"])
def test_serialization_round_trip(request, which):
    tok = request.getfixturevalue(which)
    again = tokenizer_from_bytes(tok.kind, tok.to_bytes())
    text = "Hark! 日本 🙂 what light"
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_unknown_kind_and_bad_char_data():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
        tokenizer_from_bytes("bpe", b"")
    with pytest.raises(ValueError, match="not a char tokenizer"):
        CharTokenizer.from_bytes(b'{"kind": "sentencepiece"}')


@pytest.mark.parametrize("which", ["sp", "char"])
def test_stream_never_emits_broken_characters(request, which):
    tok = request.getfixturevalue(which)
    text = "Once 🙂 upon 日本語 a time 👨‍👩‍👧!"
    stream = TextStream(tok)
    pieces = [stream.feed(i) for i in tok.encode(text)] + [stream.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    if which == "char":  # every non-ASCII char here is byte-encoded: some tokens must hold partial characters
        assert "" in pieces[:-1]


def test_stream_flushes_incomplete_character_as_replacement(char):
    stream = TextStream(char)
    first_byte = char.encode("🙂")[0]
    assert stream.feed(first_byte) == ""
    assert stream.finish() == "\ufffd"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_property_stream_equals_decode(sp, text):
    stream = TextStream(sp)
    assert "".join(stream.feed(i) for i in sp.encode(text)) + stream.finish() == text
