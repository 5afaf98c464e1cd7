"""Corpus -> tokenizer -> token file on disk -> random training windows.

A corpus is a text file, a directory of .txt files (sorted, recursively), or "" for the
bundled one: Python's own documentation (pydoc_data.topics, in every CPython), so craft-train
works offline with no arguments. Documents are streamed in ~1 MB chunks, and each chunk's
tokens go straight to the token file: memory stays bounded whatever the corpus size. Tokens go
to one uint16/uint32 file (tokens.bin) that training memory-maps; the first (1 - val_fraction)
of the tokens train, the rest is the val split (nanoGPT's split: deterministic, no shuffling).
data.json records what produced the file (corpus, tokenizer hash) and the file's own SHA-256,
so a rerun reuses it, a changed corpus or tokenizer rebuilds it, a damaged one is rebuilt, and
a resume with another tokenizer than the run's is refused (check_tokenizer).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from craft.config import MIN_SENTENCEPIECE_VOCAB, Config
from craft.run_dir import (
    CHAR_TOKENIZER,
    DATA_INFO,
    SP_TOKENIZER,
    TOKENS,
    RunDirError,
    atomic_file,
    atomic_write_bytes,
    read_small,
)
from craft.runtime.tokenizer import CHAR, CharTokenizer, SentencePieceTokenizer, Tokenizer

CHUNK_CHARS = 1 << 20  # documents are read and encoded in chunks of about this many characters
HASH_BLOCK = 1 << 24  # bytes of tokens.bin hashed / counted at a time


class DataError(ValueError):
    """A corpus that cannot be used; the message is one line naming the fix."""


# --- corpus ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """Where the text comes from; `documents()` streams it chunk by chunk."""

    path: str  # "" for the bundled corpus

    @property
    def name(self) -> str:
        return self.path or "bundled Python documentation (pydoc_data.topics)"

    def files(self) -> list[Path]:
        path = Path(self.path)
        if not path.exists():
            what = "is a symlink that leads nowhere (dangling, or a loop)" if path.is_symlink() else "does not exist"
            raise DataError(f"corpus {path} {what}; set data.path to a .txt file or a directory of .txt files")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise DataError(f"corpus directory {path} has no .txt files; add some or point data.path at a file")
            return files
        if not path.is_file():  # a pipe would block, a device never ends: only files and directories
            raise DataError(
                f"corpus {path} is not a regular file or a directory; set data.path to a .txt file or a directory"
            )
        return [path]

    def documents(self) -> Iterator[Iterator[str]]:
        """One iterator of text chunks per document; chunks end at line boundaries."""
        if not self.path:
            import pydoc_data.topics

            for key in sorted(pydoc_data.topics.topics):
                yield iter([pydoc_data.topics.topics[key]])
            return
        for file in self.files():
            yield _read_chunks(file)

    def fingerprint(self) -> str:
        """Cheap identity of the corpus: content hash for the bundled one, (name, size, mtime) of files."""
        h = hashlib.sha256()
        if not self.path:
            import pydoc_data.topics

            for key in sorted(pydoc_data.topics.topics):
                h.update(key.encode() + pydoc_data.topics.topics[key].encode())
        else:
            for file in self.files():
                st = file.stat()
                h.update(os.fsencode(file.resolve()) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())  # any name
        return h.hexdigest()


def _read_chunks(file: Path) -> Iterator[str]:
    try:
        with open(file, encoding="utf-8", newline="") as f:
            while True:
                chunk = f.read(CHUNK_CHARS)
                if not chunk:
                    return
                if not chunk.endswith("\n"):
                    chunk += f.readline(CHUNK_CHARS)  # to the line's end, unless the line is huge
                yield chunk
    except UnicodeDecodeError as e:
        raise DataError(
            f"{file} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, e.g. iconv -t UTF-8"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {file}: {e.strerror}") from None


# --- tokenizer ---------------------------------------------------------------------------------


def train_tokenizer(cfg: Config, corpus: Corpus) -> Tokenizer:
    """Build the tokenizer that cfg.tokenizer asks for from the corpus."""
    if cfg.tokenizer.kind == CHAR:
        return CharTokenizer.train(chunk for doc in corpus.documents() for chunk in doc)
    return _train_sentencepiece(cfg, corpus)


SP_MAX_LINE_BYTES = 1 << 16  # sentencepiece's max_sentence_length: longer lines are skipped, not cut
SP_LINE_CHARS = SP_MAX_LINE_BYTES // 4  # characters that fit it whatever their UTF-8 length (4 bytes at most)


def _train_sentencepiece(cfg: Config, corpus: Corpus) -> SentencePieceTokenizer:
    import sentencepiece as spm

    failed: list[DataError] = []  # a corpus file's own error, which sentencepiece wraps in its RuntimeError's text
    counted = [0]  # lines given to sentencepiece

    def lines() -> Iterator[str]:  # a line longer than max_sentence_length is cut: sentencepiece would skip it
        try:
            for doc in corpus.documents():
                for chunk in doc:
                    for line in chunk.split("\n"):
                        if line.strip():
                            counted[0] += 1
                            yield from (line[i : i + SP_LINE_CHARS] for i in range(0, len(line), SP_LINE_CHARS))
        except DataError as e:
            failed.append(e)
            raise

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=model,
            model_type=cfg.tokenizer.model_type,
            vocab_size=cfg.tokenizer.vocab_size,
            # Exact round trip of any text: no normalization, no whitespace folding, no
            # dummy space at the start, and bytes for whatever the vocabulary lacks.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            allow_whitespace_only_pieces=True,  # indentation runs in code become single pieces
            split_digits=True,
            character_coverage=0.9995,  # rare characters go to bytes instead of taking ids
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=2_000_000,  # sample at most this many lines from a huge corpus
            shuffle_input_sentence=True,
            max_sentence_length=SP_MAX_LINE_BYTES,
            # unigram's result depends on the thread count (its scores' float sums): one, so that a seed gives
            # the same tokenizer on any machine; BPE's does not, and keeps every core
            num_threads=(os.cpu_count() or 1) if cfg.tokenizer.model_type == "bpe" else 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        if not counted[0]:  # sentencepiece's own words: "INTERNAL: ... [!sentences_.empty()]"
            raise DataError(
                f"{corpus.name} holds no text, only whitespace; give a corpus of text (or tokenizer.kind=char)"
            ) from None
        message = str(e).splitlines()[-1] if str(e) else type(e).__name__
        if "smaller than required_chars" in message:  # "... 400 vs 2259. Increase vocab_size ..."
            needed = message.split(" vs ")[-1].split(".")[0]
            raise DataError(
                f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} is too small for this corpus's {needed} "
                f"distinct characters and byte pieces; raise tokenizer.vocab_size above {needed}, "
                "or use tokenizer.kind=char"
            ) from None
        if "too high" in message:  # "Vocabulary size too high (N). Please set it to a value <= M."
            most = message.rstrip(".").rsplit("<=", 1)[-1].strip()
            fix = (
                "lower tokenizer.vocab_size"
                if not most.isdigit() or int(most) >= MIN_SENTENCEPIECE_VOCAB
                else f"the smallest sentencepiece vocabulary is {MIN_SENTENCEPIECE_VOCAB}: give a larger corpus "
                "or use tokenizer.kind=char"
            )
            raise DataError(
                f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} is too large for this corpus "
                f"({message.split('. ')[-1].rstrip('.')}); {fix}"
            ) from None
        raise DataError(f"sentencepiece could not train on {corpus.name}: {message}") from None
    return SentencePieceTokenizer(without_thread_count(model.getvalue()))


def without_thread_count(model: bytes) -> bytes:
    """The trained model with the trainer's thread count (the machine's cores, kept in its trainer_spec)
    set to 1: the same bytes on any machine. The bytes unchanged where sentencepiece's generated
    protobuf module does not load with the installed protobuf (an old sentencepiece)."""
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    except Exception:  # ImportError, or protobuf's TypeError for a module generated by an older protoc
        return model
    proto.trainer_spec.num_threads = 1
    return proto.SerializeToString()


def tokenizer_file(tokenizer: Tokenizer) -> str:
    return CHAR_TOKENIZER if tokenizer.kind == CHAR else SP_TOKENIZER


def save_tokenizer(tokenizer: Tokenizer, run_dir: Path) -> Path:
    path = run_dir / tokenizer_file(tokenizer)
    atomic_write_bytes(path, tokenizer.to_bytes())
    return path


def load_tokenizer(run_dir: Path, kind: str | None = None) -> Tokenizer | None:
    """The run's tokenizer: the file of tokenizer.kind `kind` (None: whichever exists), or None
    if there is none. RunDirError if the file is damaged."""
    names = [tokenizer_file_of(kind)] if kind else [SP_TOKENIZER, CHAR_TOKENIZER]
    for name in names:
        path = Path(run_dir) / name
        if path.is_file():
            try:
                data = read_small(path)
            except OSError as e:
                raise RunDirError(f"cannot read {path} ({e.strerror}); restore the run's own tokenizer") from None
            try:
                return SentencePieceTokenizer(data) if name == SP_TOKENIZER else CharTokenizer.from_bytes(data)
            except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the parser raise
                reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
                raise RunDirError(
                    f"{path} is not a valid tokenizer ({reason}); restore it, or start the run again with --overwrite"
                ) from None
    return None


def tokenizer_file_of(kind: str) -> str:
    return CHAR_TOKENIZER if kind == CHAR else SP_TOKENIZER


def check_tokenizer(run_dir: Path, tokenizer: Tokenizer) -> None:
    """Refuse a tokenizer other than the one that made the run's tokens (recorded in data.json):
    training or exporting with it would read the token ids as other text."""
    info = read_info(Path(run_dir))
    recorded = info.get("tokenizer_sha256") if info else None
    actual = hashlib.sha256(tokenizer.to_bytes()).hexdigest()
    if recorded and recorded != actual:
        raise RunDirError(
            f"{Path(run_dir) / tokenizer_file(tokenizer)} is not the tokenizer this run was trained with "
            f"(sha256 {actual[:12]}, {DATA_INFO} records {recorded[:12]}); restore the run's own tokenizer file"
        )


def read_info(run_dir: Path) -> dict | None:
    """data.json, or None if there is none; RunDirError if it is damaged."""
    path = Path(run_dir) / DATA_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(read_small(path))
        if not isinstance(info, dict):
            raise ValueError(f"a JSON {type(info).__name__}, not an object")
        problem = info_problem(info)
        if problem:
            raise ValueError(problem)
    except RecursionError:
        raise RunDirError(
            f"{path} is damaged (nested too deeply); delete it and {TOKENS} (craft-train --resume rebuilds them)"
        ) from None
    except (ValueError, OSError) as e:
        raise RunDirError(
            f"{path} is damaged ({(e.strerror if isinstance(e, OSError) else str(e))[:120]}); "
            f"delete it and {TOKENS} (craft-train --resume rebuilds them from the corpus)"
        ) from None
    return info


# --- tokens on disk ----------------------------------------------------------------------------


@dataclass
class TokenData:
    """The memory-mapped token file split into train and val views (no copies)."""

    train: np.ndarray
    val: np.ndarray
    info: dict

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the train split's token frequencies: the loss of a model that ignores context."""
        counts = np.zeros(self.info["vocab_size"], np.float64)
        for start in range(0, len(self.train), HASH_BLOCK):  # in blocks: bincount copies to int64
            counts += np.bincount(self.train[start : start + HASH_BLOCK], minlength=len(counts))
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def info_problem(info: dict) -> str | None:
    """What is wrong with the fields of data.json that reading the token file relies on, or None."""
    if info.get("dtype") not in ("uint16", "uint32"):  # token_dtype's
        return f'dtype {json.dumps(info.get("dtype"))[:40]}, expected "uint16" or "uint32"'
    fraction = info.get("val_fraction")
    if type(fraction) not in (int, float) or not 0 <= fraction < 1:
        return f"val_fraction {json.dumps(fraction)[:40]}, expected a number in [0, 1)"
    for key in ("n_tokens", "vocab_size"):
        if key in info and (type(info[key]) is not int or info[key] < 0):
            return f"{key} {json.dumps(info[key])[:40]}, expected a count"
    return None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare_tokens(cfg: Config, corpus: Corpus, tokenizer: Tokenizer, run_dir: Path, progress=None) -> TokenData:
    """Tokenize the corpus into run_dir/tokens.bin (reused when corpus and tokenizer are unchanged)."""
    wanted = {
        "corpus": corpus.name,
        "corpus_fingerprint": corpus.fingerprint(),
        "tokenizer_sha256": hashlib.sha256(tokenizer.to_bytes()).hexdigest(),
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "val_fraction": cfg.data.val_fraction,
    }
    tokens_path = run_dir / TOKENS
    try:
        info = read_info(run_dir) or {}
    except RunDirError:  # a damaged record only costs a rebuild
        info = {}
    if not (tokens_path.is_file() and {k: info.get(k) for k in wanted} == wanted and tokens_intact(tokens_path, info)):
        info = dict(wanted, **_write_tokens(corpus, tokenizer, tokens_path, progress))
        atomic_write_bytes(run_dir / DATA_INFO, json.dumps(info, indent=1).encode())
    return open_tokens(run_dir, info, cfg.model.context_length)


def _write_tokens(corpus: Corpus, tokenizer: Tokenizer, path: Path, progress) -> dict:
    """Each document as BOS + its tokens + EOS, chunk by chunk straight into the file (through a
    temp file that any failure removes); returns the counts and the file's SHA-256."""
    dtype = token_dtype(tokenizer.vocab_size)
    n_tokens = n_docs = 0
    digest = hashlib.sha256()

    def put(f, ids: list[int]) -> None:
        nonlocal n_tokens
        data = np.asarray(ids, dtype=dtype).tobytes()
        f.write(data)
        digest.update(data)
        n_tokens += len(ids)

    with atomic_file(path) as f:
        for doc in corpus.documents():
            put(f, [tokenizer.bos_id])
            for chunk in doc:
                put(f, tokenizer.encode(chunk))
                if progress:
                    progress(len(chunk))
            put(f, [tokenizer.eos_id])
            n_docs += 1
    return {"n_tokens": n_tokens, "n_documents": n_docs, "tokens_sha256": digest.hexdigest()}


def tokens_intact(path: Path, info: dict, vocab_size: int | None = None) -> bool:
    """Whether tokens.bin has data.json's length and (when recorded) SHA-256, and only ids inside the
    vocabulary (data.json's, or `vocab_size` where that is smaller): a truncated or modified file would
    silently train on other data, and one whose hash was recomputed over ids past the vocabulary
    indexed past the embedding (a traceback in training and in export). One read does both."""
    size, dtype = path.stat().st_size, np.dtype(info["dtype"])
    if size % dtype.itemsize or ("n_tokens" in info and size != info["n_tokens"] * dtype.itemsize):
        return False
    bound = info.get("vocab_size") if type(info.get("vocab_size")) is int else None
    if vocab_size is not None:
        bound = vocab_size if bound is None else min(bound, vocab_size)
    recorded = info.get("tokens_sha256")
    digest, largest = hashlib.sha256(), -1
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):  # a multiple of every token size
            digest.update(block)
            if bound is not None:
                largest = max(largest, int(np.frombuffer(block, dtype).max()))
    return (bound is None or largest < bound) and (recorded is None or digest.hexdigest() == recorded)


def open_tokens(run_dir: Path, info: dict, context_length: int) -> TokenData:
    train, val = split_tokens(
        np.memmap(run_dir / TOKENS, dtype=np.dtype(info["dtype"]), mode="r"), info["val_fraction"]
    )
    check_splits(len(train), len(val), context_length)
    return TokenData(train, val, info)


def check_splits(train: int, val: int, context_length: int) -> None:
    """DataError unless both splits (token counts) hold a window of the context and its target."""
    for name, size in (("train", train), ("val", val)):
        if size <= context_length + 1:
            other = "larger" if name == "val" else "smaller"  # a larger val split shrinks the train split
            raise DataError(
                f"the {name} split has {size} tokens, fewer than model.context_length + 2 = {context_length + 2}; "
                f"use a larger corpus, a smaller model.context_length, or a {other} data.val_fraction"
            )


SP_MAX_PIECE_CHARS = 16  # sentencepiece's max_piece_length (the trainer's default): no piece spans more characters


def check_splits_before_writing(cfg: Config, corpus: Corpus, tokenizer: Tokenizer) -> None:
    """open_tokens' DataError, raised before any file is written: craft-train --overwrite deletes the old
    run only after this. A corpus too large for either split to fall short is not tokenized twice."""
    bytes_per_token = 4 * (1 if tokenizer.kind == CHAR else SP_MAX_PIECE_CHARS)  # UTF-8: 4 bytes a character
    least = count_chars(corpus) // bytes_per_token  # tokens, at the least
    fraction = cfg.data.val_fraction
    if min(least * fraction, least * (1 - fraction)) > cfg.model.context_length + 2:
        return
    n_tokens = sum(2 + sum(len(tokenizer.encode(chunk)) for chunk in doc) for doc in corpus.documents())
    split = int(n_tokens * (1 - fraction))  # as split_tokens
    check_splits(split, n_tokens - split, cfg.model.context_length)


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) views: the last val_fraction of the tokens is the val split (no copies)."""
    split = int(len(tokens) * (1 - val_fraction))
    return tokens[:split], tokens[split:]


def val_tokens(run_dir: Path) -> np.ndarray | None:
    """The val split of a run directory's token file (what craft-export measures perplexity on);
    None when the run has no token file."""
    split = run_splits(run_dir)
    return None if split is None else split[1]


def run_splits(run_dir: Path, vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(train, val) splits of a run directory's token file, memory-mapped; None when it has none.
    RunDirError unless it is intact (tokens_intact: ids inside `vocab_size` too, where given)."""
    tokens_path = Path(run_dir) / TOKENS
    info = read_info(Path(run_dir))
    if info is None or not tokens_path.is_file():
        return None
    if not tokens_intact(tokens_path, info, vocab_size) or tokens_path.stat().st_size == 0:
        raise RunDirError(
            f"{tokens_path} does not match {DATA_INFO} (its length, its SHA-256 or an id past the vocabulary): "
            f"it was truncated or replaced; rebuild it with craft-train --resume {run_dir}, "
            "or delete it (the export then skips the perplexity check)"
        )
    return split_tokens(np.memmap(tokens_path, dtype=np.dtype(info["dtype"]), mode="r"), info["val_fraction"])


def sample_windows(tokens: np.ndarray, batch_size: int, context: int, rng: np.random.Generator) -> np.ndarray:
    """(batch_size, context + 1) int64 windows at random offsets: inputs are [:, :-1], targets [:, 1:].

    One vectorized gather from the memory map; no per-row Python copies.
    """
    starts = rng.integers(0, len(tokens) - context - 1, size=batch_size)
    index = starts[:, None] + np.arange(context + 1)  # (B, T + 1)
    return tokens[index].astype(np.int64)


def count_chars(corpus: Corpus) -> int:
    """Total characters, for progress bars (cheap: file sizes are bytes, close enough)."""
    if not corpus.path:
        import pydoc_data.topics

        return sum(len(v) for v in pydoc_data.topics.topics.values())
    return sum(f.stat().st_size for f in corpus.files())


def describe(data: TokenData) -> str:
    n = data.info["n_tokens"]
    return (
        f"{n:,} tokens ({len(data.train):,} train / {len(data.val):,} val, "
        f"{data.info['n_documents']} documents, {data.info['dtype']})"
    )
