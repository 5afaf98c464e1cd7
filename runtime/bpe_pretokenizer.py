"""The text-splitting half of a Hugging Face tokenizer.json, in pure Python: normalizers and pre-tokenizers.

Used by craft.runtime.bpe_tokenizer when the `tokenizers` library is not installed (32-bit ARM
boards without a wheel). Each step is a function from pieces to pieces that does what the
library's step of the same name does, so the BPE model then sees the same words:

    normalizers      Sequence, Prepend, Replace, NFC / NFD / NFKC / NFKD, Lowercase
    pre-tokenizers   Sequence, ByteLevel (GPT-2's regex), Split (string or regex), Digits, Metaspace

A piece is (text, at_start): at_start says it begins at offset 0 of the original text, which
Metaspace's prepend_scheme "first" asks about. Regexes in tokenizer.json are written for
Oniguruma, which knows Unicode classes (\\p{L}) that Python's `re` lacks: `onig_to_python`
rewrites them as explicit ranges built from `unicodedata`, and spells \\s as Unicode White_Space
(Python's \\s also matches \\x1c-\\x1f, Oniguruma's does not).

Standard library only: the runtime imports this file.
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache, lru_cache
from typing import Callable

Piece = tuple[str, bool]  # (text, begins at offset 0 of the original text)
Step = Callable[[list[Piece]], list[Piece]]

# The regex ByteLevel splits with when use_regex is true (GPT-2's, as the tokenizers library spells it).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Unicode White_Space: what Oniguruma's \s matches in a UTF-8 pattern.
WHITE_SPACE_CHARS = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
WHITE_SPACE = "\\t\\n\\x0b\\x0c\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
# Letters and numbers live in planes 0-3; planes 4-16 hold none (unassigned, tags, private use).
LAST_CLASSIFIED = 0x3FFFF


class UnsupportedTokenizer(ValueError):
    """A tokenizer.json step this pure-Python fallback does not implement."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which byte-level vocabularies are written in."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


BYTE_CHAR = bytes_to_unicode()
CHAR_BYTE = {c: b for b, c in BYTE_CHAR.items()}


@cache
def category_class(name: str) -> str:
    """The body of a `re` character class matching Unicode general category `name` ("L", "Nd", ...)."""
    ranges: list[list[int]] = []
    for cp in range(LAST_CLASSIFIED + 1):
        if unicodedata.category(chr(cp)).startswith(name):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    if not ranges:
        raise UnsupportedTokenizer(f"regex class \\p{{{name}}} names no Unicode general category")
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


@lru_cache(maxsize=32)
def onig_to_python(pattern: str) -> re.Pattern:
    """Compile an Oniguruma regex from a tokenizer.json with Python's `re`, with the same matches.
    A repeated group that itself repeats or alternates - (x+x+)+, (a|ab)* - is refused: on a
    hostile file's pattern `re` would backtrack for hours, where Oniguruma gives up at its retry
    limit. No real tokenizer's split regex repeats such a group."""
    out: list[str] = []
    i, in_class = 0, False
    groups: list[bool] = []  # per open group: it holds a quantifier or an alternation
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt in "pP" and pattern[i + 2 : i + 3] == "{":
                end = pattern.index("}", i)
                body = category_class(pattern[i + 3 : end])
                if nxt == "P" and in_class:
                    raise UnsupportedTokenizer(f"regex {pattern!r}: \\P{{..}} inside [...] is not supported")
                out.append(body if in_class else (f"[{'^' if nxt == 'P' else ''}{body}]"))
                i = end + 1
                continue
            if nxt in "sS":
                if nxt == "S" and in_class:
                    raise UnsupportedTokenizer(f"regex {pattern!r}: \\S inside [...] is not supported")
                out.append(WHITE_SPACE if in_class else f"[{'^' if nxt == 'S' else ''}{WHITE_SPACE}]")
                i += 2
                continue
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            out.append(c)
            if pattern[i + 1 : i + 2] == "^":
                out.append("^")
                i += 1
            if pattern[i + 1 : i + 2] == "]":  # a leading ] is a literal
                out.append("\\]")
                i += 1
        elif c == "[" and in_class:
            raise UnsupportedTokenizer(f"regex {pattern!r}: nested [...] classes are not supported")
        elif c == "]" and in_class:
            in_class = False
            out.append(c)
        else:
            if not in_class:
                check_backtracking(pattern, i, groups)
            out.append(c)
        i += 1
    try:
        return re.compile("".join(out))
    except re.error as e:
        raise UnsupportedTokenizer(f"regex {pattern!r} does not translate to Python ({e})") from None


def check_backtracking(pattern: str, i: int, groups: list[bool]) -> None:
    """onig_to_python's guard, fed each character pattern[i] outside [...] and escapes: keeps
    `groups` and refuses a group that repeats (*, +, {n,}) while holding a quantifier or a |."""
    c, after = pattern[i], pattern[i + 1 : i + 2]
    if c == "(":
        groups.append(False)
    elif (
        c in "*+|"
        or (c == "{" and after.isascii() and after.isdigit())
        or (c == "?" and i > 0 and pattern[i - 1] not in "(*+?}")  # x? (not (?: or a lazy +?)
    ):
        groups[:] = [True] * len(groups)  # every group around it now varies in length or in choice
    elif c == ")" and groups and groups.pop():
        repeats = after in ("*", "+") or (after == "{" and not re.match(r"\{(\d+)(,\1)?\}", pattern[i + 1 :]))
        if repeats:
            raise UnsupportedTokenizer(
                f"regex {pattern!r} repeats a group that itself repeats or alternates, which Python's re can take "
                "hours to match; install the tokenizers library to use this tokenizer"
            )


# ---- splitting a piece (the library's NormalizedString::split) ----


SPLIT_BEHAVIORS = ("isolated", "removed", "contiguous", "mergedwithprevious", "mergedwithnext")  # lowercased


def split_piece(piece: Piece, spans: list[tuple[int, int]], behavior: str, invert: bool = False) -> list[Piece]:
    """Cut piece at the match spans (sorted, non-overlapping) as SplitDelimiterBehavior `behavior` says."""
    text, at_start = piece
    marked: list[tuple[int, int, bool]] = []  # (start, end, is_match) covering text
    pos = 0
    for a, b in spans:
        if a > pos:
            marked.append((pos, a, invert))
        marked.append((a, b, not invert))
        pos = b
    if pos < len(text):
        marked.append((pos, len(text), invert))
    kept: list[list] = []  # [start, end, remove]
    behavior = behavior.lower()
    if behavior == "isolated":
        kept = [[a, b, False] for a, b, _ in marked]
    elif behavior == "removed":
        kept = [[a, b, m] for a, b, m in marked]
    elif behavior in ("contiguous", "mergedwithprevious"):
        previous = False
        for a, b, m in marked:
            join = (m == previous) if behavior == "contiguous" else (m and not previous)
            if join and kept:
                kept[-1][1] = b
            else:
                kept.append([a, b, False])
            previous = m
    elif behavior == "mergedwithnext":
        previous = False
        for a, b, m in reversed(marked):
            if m and not previous and kept:
                kept[-1][0] = a
            else:
                kept.append([a, b, False])
            previous = m
        kept.reverse()
    else:
        raise AssertionError(behavior)  # pre_tokenizer() checked it against SPLIT_BEHAVIORS
    return [(text[a:b], at_start and a == 0) for a, b, remove in kept if not remove and b > a]


def regex_spans(pattern: re.Pattern, text: str) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(text)]


def char_spans(predicate: Callable[[str], bool], text: str) -> list[tuple[int, int]]:
    return [(i, i + 1) for i, c in enumerate(text) if predicate(c)]


def literal_spans(needle: str, text: str) -> list[tuple[int, int]]:
    spans, start = [], text.find(needle) if needle else -1
    while start >= 0:
        spans.append((start, start + len(needle)))
        start = text.find(needle, start + len(needle))
    return spans


def is_numeric(c: str) -> bool:
    """Rust's char::is_numeric: general categories Nd, Nl, No."""
    return unicodedata.category(c) in ("Nd", "Nl", "No")


# ---- normalizers: str -> str, applied to each stretch of text between added tokens ----


def setting(spec: dict, key: str, kind: type, default=None):
    """spec[key] (default where absent and one is given), checked to be of `kind` as the library checks
    it at load: the file's tokenizer.json is untrusted, and a number where text belongs failed only
    once a prompt was encoded, as a traceback."""
    value = spec.get(key, default)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise UnsupportedTokenizer(
            f"tokenizer.json's {str(spec.get('type'))[:40]} step has {key} = {value!r:.40}, expected a {kind.__name__}"
        )
    return value


def step_kind(spec, what: str) -> str:
    if not isinstance(spec, dict):
        raise UnsupportedTokenizer(f"tokenizer.json's {what} steps must be objects, not {spec!r:.40}")
    return spec.get("type")


def pattern(spec: dict) -> tuple[str | None, re.Pattern | None]:
    """A Replace or Split step's pattern: (the literal, None) or (None, the regex)."""
    p = setting(spec, "pattern", dict)
    if isinstance(p.get("String"), str):
        return p["String"], None
    if isinstance(p.get("Regex"), str):
        return None, onig_to_python(p["Regex"])
    raise UnsupportedTokenizer(f"tokenizer.json's {spec['type']} pattern is {p!r:.60}, expected a String or a Regex")


def normalizer(spec: dict | None) -> Callable[[str], str]:
    if spec is None:
        return lambda s: s
    kind = step_kind(spec, "normalizer")
    if kind == "Sequence":
        steps = [normalizer(s) for s in setting(spec, "normalizers", list)]

        def sequence(s: str) -> str:
            for step in steps:
                s = step(s)
            return s

        return sequence
    if kind == "Prepend":
        prepend = setting(spec, "prepend", str)
        return lambda s: prepend + s if s else s
    if kind == "Replace":
        content = setting(spec, "content", str)
        literal, regex = pattern(spec)
        if regex is None:
            return lambda s: s.replace(literal, content)
        return lambda s: regex.sub(lambda m: content, s)
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s: unicodedata.normalize(kind, s)
    if kind == "Lowercase":
        return lowercase
    raise UnsupportedTokenizer(
        f"normalizer {kind!r} is not supported by the pure-Python tokenizer; pip install tokenizers"
    )


# ---- pre-tokenizers: list of pieces -> list of pieces ----


def pre_tokenizer(spec: dict | None) -> Step:
    if spec is None:
        return lambda pieces: pieces
    kind = step_kind(spec, "pre-tokenizer")
    if kind == "Sequence":
        steps = [pre_tokenizer(s) for s in setting(spec, "pretokenizers", list)]

        def sequence(pieces: list[Piece]) -> list[Piece]:
            for step in steps:
                pieces = step(pieces)
            return pieces

        return sequence
    if kind == "ByteLevel":
        return byte_level(setting(spec, "add_prefix_space", bool, True), setting(spec, "use_regex", bool, True))
    if kind == "Split":
        behavior, invert = setting(spec, "behavior", str), setting(spec, "invert", bool, False)
        if behavior.lower() not in SPLIT_BEHAVIORS:
            raise UnsupportedTokenizer(f"split behavior {behavior[:40]!r} is not supported")
        literal, regex = pattern(spec)
        if regex is None:
            return each(lambda p: split_piece(p, literal_spans(literal, p[0]), behavior, invert))
        return each(lambda p: split_piece(p, regex_spans(regex, p[0]), behavior, invert))
    if kind == "Digits":
        behavior = "isolated" if setting(spec, "individual_digits", bool, False) else "contiguous"
        return each(lambda p: split_piece(p, char_spans(is_numeric, p[0]), behavior))
    if kind == "Metaspace":
        return metaspace(spec)
    raise UnsupportedTokenizer(
        f"pre-tokenizer {kind!r} is not supported by the pure-Python tokenizer; pip install tokenizers"
    )


def each(split: Callable[[Piece], list[Piece]]) -> Step:
    return lambda pieces: [out for piece in pieces for out in split(piece)]


def byte_level(add_prefix_space: bool, use_regex: bool) -> Step:
    regex = onig_to_python(GPT2_SPLIT) if use_regex else None

    def split(piece: Piece) -> list[Piece]:
        text, at_start = piece
        if add_prefix_space and not text.startswith(" "):
            text = " " + text
        parts = split_piece((text, at_start), regex_spans(regex, text), "isolated") if regex else [(text, at_start)]
        return [("".join(BYTE_CHAR[b] for b in t.encode("utf-8", "surrogatepass")), s) for t, s in parts]

    return each(split)


def metaspace(spec: dict) -> Step:
    replacement = setting(spec, "replacement", str, "\u2581")
    if len(replacement) != 1:  # a char in the library
        raise UnsupportedTokenizer(
            f"tokenizer.json's Metaspace replacement is {replacement[:40]!r}, expected one character"
        )
    scheme = spec.get("prepend_scheme")
    if scheme is None:  # files older than prepend_scheme spell it add_prefix_space
        scheme = "always" if setting(spec, "add_prefix_space", bool, True) else "never"
    if scheme not in ("always", "first", "never"):
        raise UnsupportedTokenizer(
            f"tokenizer.json's Metaspace prepend_scheme is {scheme!r:.40}, expected always, first or never"
        )
    do_split = setting(spec, "split", bool, True)

    def split(piece: Piece) -> list[Piece]:
        text, at_start = piece
        text = text.replace(" ", replacement)
        if not text.startswith(replacement) and (scheme == "always" or (scheme == "first" and at_start)):
            text = replacement + text
        if not do_split:
            return [(text, at_start)]
        return split_piece((text, at_start), char_spans(lambda c: c == replacement, text), "mergedwithnext")

    return each(split)


def lowercase(text: str) -> str:
    """Each character lowercased on its own, as the tokenizers library (Rust's char::to_lowercase) does:
    str.lower() writes a word-final capital sigma as a final sigma (its one context rule), the library as σ."""
    return text.lower() if "\u03a3" not in text else "".join(map(str.lower, text))
