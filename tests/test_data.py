"""Corpus sources, the deterministic split, the memory-mapped token cache, batch sampling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from craft.config import load_config
from craft.data import Corpus, DataError, prepare_tokens, sample_windows, token_dtype, train_tokenizer


def char_cfg(*extra):
    return load_config("tiny", ["tokenizer.kind=char", "model.context_length=16", *extra])


def prepare(tmp_path, corpus_path, *extra):
    cfg = char_cfg(*extra)
    corpus = Corpus(str(corpus_path))
    tok = train_tokenizer(cfg, corpus)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    return prepare_tokens(cfg, corpus, tok, run), tok, run


def test_file_corpus_split_is_deterministic_and_complete(tmp_path, small_corpus):
    data, tok, run = prepare(tmp_path, small_corpus)
    text = small_corpus.read_text(encoding="utf-8")
    all_ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    assert data.info["n_tokens"] == len(all_ids)
    assert np.array_equal(np.concatenate([data.train, data.val]), np.array(all_ids))
    assert len(data.val) == len(all_ids) - int(len(all_ids) * 0.9)  # the tail is the val split
    (tmp_path / "other").mkdir()
    again, _, _ = prepare(tmp_path / "other", small_corpus)
    assert np.array_equal(again.train, data.train) and np.array_equal(again.val, data.val)


def test_tokens_are_memory_mapped_with_small_dtype(tmp_path, small_corpus):
    data, _, run = prepare(tmp_path, small_corpus)
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    assert (run / "tokens.bin").stat().st_size == data.info["n_tokens"] * 2
    assert token_dtype(70_000) == np.uint32 and token_dtype(65_536) == np.uint16


def test_cache_reused_then_rebuilt_when_corpus_changes(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 300)
    data, tok, run = prepare(tmp_path, corpus)
    stamp = (run / "tokens.bin").stat().st_mtime_ns
    cfg = char_cfg()
    prepare_tokens(cfg, Corpus(str(corpus)), tok, run)
    assert (run / "tokens.bin").stat().st_mtime_ns == stamp  # reused
    corpus.write_text("hello world\n" * 400)
    os.utime(corpus, ns=(stamp + 10**9, stamp + 10**9))
    data2 = prepare_tokens(cfg, Corpus(str(corpus)), tok, run)
    assert data2.info["n_tokens"] > data.info["n_tokens"]  # rebuilt
    assert json.loads((run / "data.json").read_text())["n_tokens"] == data2.info["n_tokens"]


def test_directory_corpus_reads_txt_files_sorted_as_documents(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bbbb " * 100)
    (root / "sub" / "a.txt").write_text("aaaa " * 100)
    (root / "skip.md").write_text("not read")
    corpus = Corpus(str(root))
    assert [p.name for p in corpus.files()] == ["b.txt", "a.txt"]  # sorted by path: root/b.txt < root/sub/a.txt
    data, tok, _ = prepare(tmp_path, root)
    assert data.info["n_documents"] == 2
    tokens = np.concatenate([data.train, data.val])
    assert (tokens == tok.bos_id).sum() == 2 and (tokens == tok.eos_id).sum() == 2
    assert "not read" not in tok.decode(tokens)


def test_bundled_corpus_is_python_docs():
    corpus = Corpus("")
    docs = [("".join(doc)) for doc in corpus.documents()]
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    assert any("lambda" in d for d in docs)


@pytest.mark.parametrize(
    "setup, pattern",
    [
        (lambda p: p / "missing.txt", "does not exist; set data.path"),
        (lambda p: (p / "loop.txt").symlink_to("loop.txt") or p / "loop.txt", "symlink that leads nowhere"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "has no .txt files"),
        (lambda p: (p / "bad.txt").write_bytes(b"ok\xff\xfe bad") and p / "bad.txt", "is not UTF-8 text"),
        (lambda p: os.mkfifo(p / "pipe.txt") or p / "pipe.txt", "is not a regular file or a directory"),  # blocked
        (lambda p: Path("/dev/zero"), "is not a regular file or a directory"),  # never ended
    ],
)
def test_bad_corpus_one_line_error(tmp_path, setup, pattern):
    path = setup(tmp_path)
    with pytest.raises(DataError, match=pattern) as info:
        prepare(tmp_path, path)
    assert "\n" not in str(info.value)


def test_corpus_too_small_for_context(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("tiny")
    with pytest.raises(DataError, match="fewer than model.context_length.*or a smaller data.val_fraction"):
        prepare(tmp_path, corpus)  # the train split is short: a larger val_fraction would make it shorter


def test_sentencepiece_vocab_too_large_is_a_config_error(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc def\n" * 50)
    cfg = load_config("tiny", ["tokenizer.vocab_size=5000"])
    with pytest.raises(DataError, match="tokenizer.vocab_size=5000 is too large"):
        train_tokenizer(cfg, Corpus(str(corpus)))


def test_sentencepiece_trains_on_a_corpus_that_is_one_long_line(tmp_path):
    """sentencepiece skips lines over max_sentence_length (64 KiB): a corpus of one 150 KB line (a
    minified file, text without newlines) left it nothing, an INTERNAL assertion; lines are now cut."""
    corpus = tmp_path / "one.txt"
    english = (REPO / "export" / "perplexity_text.txt").read_text(encoding="utf-8").replace("\n", " ")
    corpus.write_text(english * 12, encoding="utf-8")  # no newline
    cfg = load_config("tiny", [f"data.path={corpus}", "tokenizer.vocab_size=512"])
    tokenizer = train_tokenizer(cfg, Corpus(str(corpus)))
    assert tokenizer.vocab_size == 512 and tokenizer.decode(tokenizer.encode("The end é")) == "The end é"


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_bytes_do_not_depend_on_the_cores(tmp_path, small_corpus, monkeypatch, model_type):
    """The trainer's thread count (the machine's cores) was stored in tokenizer.model: the same seed and
    config gave another tokenizer hash, and another file, on a machine with other cores (and unigram's
    scores themselves depend on it)."""
    import os

    cfg = load_config("tiny", ["tokenizer.vocab_size=400", f"tokenizer.model_type={model_type}"])
    trained = []
    for cores in (1, 3):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        trained.append(train_tokenizer(cfg, Corpus(str(small_corpus))).to_bytes())
    assert trained[0] == trained[1]


def test_sample_windows_shapes_targets_and_determinism():
    tokens = np.arange(1000, dtype=np.uint16)
    a = sample_windows(tokens, 4, 8, np.random.default_rng(0))
    b = sample_windows(tokens, 4, 8, np.random.default_rng(0))
    assert a.shape == (4, 9) and a.dtype == np.int64 and np.array_equal(a, b)
    assert np.all(np.diff(a, axis=1) == 1)  # consecutive tokens: targets are inputs shifted by one
    assert a.max() < 1000


def test_sentencepiece_vocab_too_small_for_the_characters_says_so(tmp_path):
    corpus = tmp_path / "cjk.txt"
    chars = "".join(chr(0x4E00 + i) for i in range(600))
    corpus.write_text("\n".join(chars[i : i + 40] for i in range(0, 600, 40)) * 3, encoding="utf-8")
    cfg = load_config("tiny", [f"data.path={corpus}", "tokenizer.vocab_size=400"])
    with pytest.raises(
        DataError,
        match=r"tokenizer.vocab_size=400 is too small for this corpus's \d+ distinct characters"
        r".*raise tokenizer.vocab_size",
    ) as info:
        train_tokenizer(cfg, Corpus(str(corpus)))
    assert "too large" not in str(info.value)


def test_sentencepiece_failures_name_the_corpus_problem_and_a_fix_that_applies(tmp_path):
    """A one-byte corpus was told 'set it to a value <= 260; lower tokenizer.vocab_size', which the
    config refuses below 300; a whitespace-only corpus got sentencepiece's '[!sentences_.empty()]';
    a file that is not UTF-8 in a corpus directory lost its message inside sentencepiece's."""
    tiny = tmp_path / "one.txt"
    tiny.write_text("a")
    cfg = load_config("tiny", [f"data.path={tiny}", "tokenizer.vocab_size=300"])
    with pytest.raises(DataError, match="smallest sentencepiece vocabulary is 300: give a larger corpus or use"):
        train_tokenizer(cfg, Corpus(str(tiny)))
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n\t  \n")
    with pytest.raises(DataError, match="blank.txt holds no text, only whitespace"):
        train_tokenizer(load_config("tiny", [f"data.path={blank}"]), Corpus(str(blank)))
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 300)
    (folder / "b.txt").write_bytes(b"hello world \xff\xfe bad\n")
    with pytest.raises(DataError, match="b.txt is not UTF-8 text \\(byte 12"):
        train_tokenizer(load_config("tiny", [f"data.path={folder}", "tokenizer.vocab_size=300"]), Corpus(str(folder)))


def test_val_split_is_the_one_training_uses(tmp_path):
    """craft-export's val tokens (data.val_tokens) are the trainer's val split, element for element."""
    from craft.data import val_tokens

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    cfg = load_config(
        "tiny", [f"data.path={corpus}", "tokenizer.kind=char", "data.val_fraction=0.2", "model.context_length=16"]
    )
    assert val_tokens(tmp_path) is None  # no token file yet
    data = prepare_tokens(cfg, Corpus(str(corpus)), train_tokenizer(cfg, Corpus(str(corpus))), tmp_path)
    val = val_tokens(tmp_path)
    assert np.array_equal(val, data.val) and len(val) + len(data.train) == data.info["n_tokens"]


def test_token_file_without_a_hash_must_hold_vocabulary_ids(tmp_path):
    """An older data.json records no SHA-256: the file's ids must at least be the tokenizer's, or
    training and export index past the embedding (a broadcast error / IndexError traceback)."""
    from craft.data import TOKENS, tokens_intact

    path = tmp_path / TOKENS
    np.array([1, 2, 3, 1023], np.uint16).tofile(path)
    info = {"n_tokens": 4, "dtype": "uint16", "vocab_size": 1024}
    assert tokens_intact(path, info)
    np.array([1, 2, 3, 65535], np.uint16).tofile(path)
    assert not tokens_intact(path, info)


def test_token_file_with_a_recomputed_hash_must_hold_vocabulary_ids(tmp_path):
    """A hash recomputed over ids past the vocabulary passed as intact: resume died in a numpy broadcast
    error, export in an IndexError. The ids are checked in the hash's own read, against data.json's
    vocabulary or a smaller one the caller gives (the model's, where data.json lies)."""
    import hashlib

    from craft.data import TOKENS, tokens_intact

    path = tmp_path / TOKENS
    tokens = np.array([1, 2, 3, 1023], np.uint16)
    tokens.tofile(path)
    info = {"n_tokens": 4, "dtype": "uint16", "vocab_size": 1024, "tokens_sha256": hashlib.sha256(tokens).hexdigest()}
    assert tokens_intact(path, info) and not tokens_intact(path, info, vocab_size=1000)
    tokens[-1] = 60000
    tokens.tofile(path)
    info["tokens_sha256"] = hashlib.sha256(tokens).hexdigest()
    assert not tokens_intact(path, info)
    assert not tokens_intact(path, {**info, "vocab_size": 65535}, vocab_size=1024)


def test_data_json_nested_past_the_stack_is_one_line(tmp_path):
    from craft.data import DATA_INFO, read_info
    from craft.run_dir import RunDirError

    (tmp_path / DATA_INFO).write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(RunDirError, match="nested too deeply"):
        read_info(tmp_path)
