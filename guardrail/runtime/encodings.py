"""Plain readings of encoded requests: what an encoded request asks, for the query check to read.

A request sent in base64, hex, ROT13 (or any Caesar shift), Atbash, backwards, in leetspeak or
with its letters spaced out asks for the same thing as its plain words: a model that reads the
encoding serves that request, and one that cannot serves nothing. The safety head reads plain
words well and encodings hardly at all (AUROC 0.53-0.70 within leetspeak, ROT13 and spaced
letters; README, "Attacks"): as written, it flagged 11 of 265 encoded harmful requests, and 5
of 8 benign base64 ones. So the query check reads an encoded request four ways, as written, as
its decoded spans alone, as its text with them in place and as what it says around them
(``GuardRequest.readings``, decoded in the slot's own sequence first), and weighs them with
:func:`encoded_risk`; ``CheckEvent.reading`` names the encodings it undid (README, "Encoded
requests, read in plain words"). A request split into quoted pieces is read joined, and weighed
the same way (:mod:`.splits`; ``read_request`` and ``read_conversation`` return either reading).

Only a reading that turns non-words into words counts. A span is replaced by its decoding when
the decoding is mostly common English words (``common_words.txt``: the 5,000 commonest words of
the training split's plain requests) and the span was not. So English text, code, other
languages, digests and binary base64 yield no reading, and nothing here depends on how an attack
suite words its wrapper. A pure function of the text: no model, no state.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from guardrail._ciphers import atbash, caesar

from . import splits

WORDS_FILE = Path(__file__).with_name("common_words.txt")

# A decoding must read as mostly common words: at least this share of its words, and at least
# MIN_WORDS different ones; the span it replaces must read far less (MAX_SHARE_BEFORE of its tokens
# common words, a share of words MIN_GAIN below the decoding's).
MIN_SHARE = 0.6
MIN_WORDS = 3
MAX_SHARE_BEFORE = 0.35
MIN_GAIN = 0.3
# The decoded spans are read as the request only where they are at least this share of its words
# (a leetspeak line inside a long jailbreak template is a fragment, not the request).
MIN_DECODED_SHARE = 0.15

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_B64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/=_-])")
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[ :]?){8,}(?![0-9A-Fa-f])")
_TOKEN = re.compile(r"\S+")
_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a", "$": "s",
         "!": "i", "|": "l", "+": "t"}
_ABOUT_ENCODING = re.compile(r"\b(?:decod\w*|encod\w*|decipher\w*|decrypt\w*|encrypt\w*|cipher\w*|base-?64|hex\w*|"
                             r"rot-?13|caesar|atbash|leet\w*|backwards?|revers\w*|right to left|spaced|binary|morse|"
                             r"ascii|utf-?8)\b", re.IGNORECASE)
_SEPARATORS = re.compile(r"\s*[/|]\s*|\s{2,}")


@cache
def common_words() -> frozenset[str]:
    lines = WORDS_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(w for w in lines if w and not w.startswith("#"))


def words_of(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _words(text: str) -> list[str]:
    """The words of two letters or more: a lone letter is a word in any encoding."""
    return [w for w in words_of(text) if len(w) > 1]


def word_share(text: str) -> tuple[int, float]:
    """(distinct common words, the share of common words among all words) in ``text``, counting
    words of two letters or more."""
    words = _words(text)
    known = [w for w in words if w in common_words()]
    return len(set(known)), (len(known) / len(words) if words else 0.0)


def readable(text: str) -> bool:
    """Printable text whose words are mostly common English words, MIN_WORDS different ones at least."""
    if not text or sum(c.isprintable() or c in "\n\t" for c in text) < 0.97 * len(text):
        return False
    known, share = word_share(text)
    return known >= MIN_WORDS and share >= MIN_SHARE


# --- byte encodings: spans found by their alphabet ------------------------------------------

def _from_base64(span: str) -> str | None:
    s = span.rstrip("=")
    try:
        raw = base64.b64decode(s + "=" * (-len(s) % 4), altchars=b"-_" if ("-" in s or "_" in s) else None,
                               validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def _from_hex(span: str) -> str | None:
    digits = re.sub(r"[ :]", "", span)
    if len(digits) % 2:
        return None
    try:
        return bytes.fromhex(digits).decode("utf-8")
    except ValueError:
        return None


Piece = tuple[str, str | None]  # (text, the encoding it was written in; None: as the user wrote it)
Found = Iterable[tuple[int, int, str, str]]  # (start, end, encoding, decoded text) of spans in a text


def _decoded(pieces: list[Piece], find: Callable[[str], Found]) -> list[Piece]:
    """The pieces the user wrote split where ``find`` finds encoded spans; decoded pieces stay as they are."""
    out: list[Piece] = []
    for text, kind in pieces:
        if kind is not None:
            out.append((text, kind))
            continue
        last = 0
        for start, end, name, plain in find(text):
            out += [(text[last:start], None), (plain, name)]
            last = end
        out.append((text[last:], None))
    return out


def _byte_spans(name: str, pattern: re.Pattern[str], decode: Callable[[str], str | None]) -> Callable[[str], Found]:
    def find(text: str) -> Found:
        for m in pattern.finditer(text):
            plain = decode(m.group().strip())
            if plain is not None and readable(plain):
                yield m.start(), m.end(), name, plain
    return find


# --- letter encodings: runs of tokens that are not words ------------------------------------

def _unleet_word(word: str) -> str:
    if not any(c in _LEET for c in word) or not any(c.isalpha() for c in word) and len(word) > 2:
        return word
    plain = "".join(_LEET.get(c, c) for c in word)
    if not all(w in common_words() for w in words_of(plain)) and "1" in word:
        other = "".join("l" if c == "1" else _LEET.get(c, c) for c in word)
        if all(w in common_words() for w in words_of(other)):
            return other
    return plain


def _unleet(text: str) -> str:
    return re.sub(r"\S+", lambda m: _unleet_word(m.group()), text)


def _segment(letters: str) -> str:
    """Common words that spell ``letters`` exactly, fewest words first; unchanged if none do."""
    n = len(letters)
    best: list[tuple[int, int] | None] = [(0, 0)] + [None] * n  # (words used, start of the last word)
    for end in range(1, n + 1):
        for start in range(max(0, end - 20), end):
            prev = best[start]
            if prev is not None and letters[start:end].lower() in common_words():
                if best[end] is None or prev[0] + 1 < best[end][0]:  # type: ignore[index]
                    best[end] = (prev[0] + 1, start)
    if best[n] is None:
        return letters
    words, end = [], n
    while end:
        start = best[end][1]  # type: ignore[index]
        words.append(letters[start:end])
        end = start
    return " ".join(reversed(words))


def _unspace(text: str) -> str:
    """'h o w / t o' -> 'how to'; without separators, the letters are split into common words."""
    groups = [g for g in _SEPARATORS.split(text.strip()) if g]
    if len(groups) > 1:
        return " ".join("".join(g.split()) for g in groups)
    return _segment("".join(text.split()))


_LETTER_DECODERS: dict[str, Callable[[str], str]] = {
    "reversed": lambda s: s[::-1],
    "leetspeak": _unleet,
    "spaced": _unspace,
    "atbash": atbash,
    "rot13": lambda s: caesar(s, 13),
    **{f"caesar{k}": (lambda k: lambda s: caesar(s, -k))(k) for k in range(1, 26) if k != 13},
}


def _kind(token: str) -> str:
    """'word' (common words only), 'other' (letters or digits that are not, or a lone letter: spaced
    letters make 'a' and 'I' at random), 'mark' (neither)."""
    if not any(c.isalnum() for c in token):
        return "mark"
    if sum(c.isalnum() for c in token) == 1:
        return "other"
    words = words_of(token)
    return "word" if words and all(w in common_words() for w in words) and not any(c.isdigit() for c in token) \
        else "other"


def _runs(text: str) -> Iterable[tuple[int, int]]:
    """Spans that start and end on a token that is not a common word, with at least MIN_WORDS such
    tokens, and never two common words in a row (an encoding makes a word now and then by chance:
    'era' in reversed text, 'be' in ROT13; plain text makes them in a row)."""
    tokens = list(_TOKEN.finditer(text))
    kinds = [_kind(t.group()) for t in tokens]
    i = 0
    while i < len(tokens):
        if kinds[i] != "other":
            i += 1
            continue
        last, others, j = i, 1, i + 1
        while j < len(tokens):
            if kinds[j] == "other":
                last, others = j, others + 1
            elif kinds[j] == "word":
                nxt = next((k for k in range(j + 1, len(tokens)) if kinds[k] != "mark"), None)
                if nxt is None or kinds[nxt] != "other":
                    break
            j += 1
        if others >= MIN_WORDS:
            yield tokens[i].start(), tokens[last].end()
        i = last + 1


def _applies(name: str, span: str) -> bool:
    """Spaced letters are lone characters; leetspeak mixes letters and digits within words."""
    tokens = [t for t in span.split() if any(c.isalnum() for c in t)]
    if name == "spaced":
        return sum(len(t) == 1 for t in tokens) >= 0.7 * len(tokens)
    if name == "leetspeak":
        return sum(any(c.isalpha() for c in t) and any(c in _LEET for c in t) for t in tokens) >= 2
    return True


def _token_share(span: str) -> float:
    """The share of a span's tokens (those with a letter or digit) that are common words as written."""
    kinds = [k for k in map(_kind, span.split()) if k != "mark"]
    return sum(k == "word" for k in kinds) / len(kinds) if kinds else 0.0


def _gains_words(span: str, plain: str) -> bool:
    """The decoding reads, and it reads because of the decoding: MIN_WORDS common words it has that the
    span had not, and a share of common words MIN_GAIN above the span's (code and prose with numbers
    read as well before as after)."""
    if not readable(plain):
        return False
    known_before, known_after = ({w for w in _words(t) if w in common_words()} for t in (span, plain))
    return len(known_after - known_before) >= MIN_WORDS and word_share(plain)[1] - _token_share(span) >= MIN_GAIN


def _best_letter_decoding(span: str) -> tuple[str, str] | None:
    alnum = [c for c in span if c.isalnum()]
    if sum(not c.isascii() for c in alnum) > 0.05 * len(alnum) or _token_share(span) > MAX_SHARE_BEFORE:
        return None  # the encodings here write ASCII; other scripts and plain text are not theirs
    found = [(word_share(plain), name, plain) for name, decode in _LETTER_DECODERS.items()
             if _applies(name, span) and (plain := decode(span)) != span and _gains_words(span, plain)]
    if not found:
        return None
    _, name, plain = max(found, key=lambda f: (f[0][1], f[0][0]))
    return ("caesar" if name.startswith("caesar") else name), plain


def _trimmed(text: str, start: int, end: int) -> tuple[int, int, tuple[str, str]] | None:
    """The decoding of the longest part of a run, up to two tokens less at either end, that reads:
    a plain word beside the encoded span can drag the whole run's reading under MIN_SHARE. Longest
    first: a word of the request that is not a common one ('cookies') must not be cut off."""
    tokens = list(_TOKEN.finditer(text, start, end))
    best: tuple[int, float, int, int, tuple[str, str]] | None = None
    trims = 3 if len(tokens) <= 64 else 1  # a long run is decoded whole: its edges hardly move its reading
    for a in range(min(trims, len(tokens))):
        for b in range(len(tokens), max(a, len(tokens) - trims), -1):
            if b - a < MIN_WORDS:
                continue
            s, e = tokens[a].start(), tokens[b - 1].end()
            decoded = _best_letter_decoding(text[s:e])
            if decoded is not None:
                key = (b - a, word_share(decoded[1])[1])
                if best is None or key > best[:2]:
                    best = (*key, s, e, decoded)
    return None if best is None else (best[2], best[3], best[4])


def _letter_spans(text: str) -> Found:
    for start, end in _runs(text):
        found = _trimmed(text, start, end)
        if found is not None:
            s, e, (name, plain) = found
            yield s, e, name, plain


@dataclass(frozen=True)
class PlainRequest:
    """An encoded request read in plain words, three ways: its decoded spans alone, one per line
    (what it asks), its text with them in place (what it says, made legible), and what it says
    around them (:func:`.splits.said_around`: None when that is next to nothing); the encodings undone."""

    alone: str
    in_place: str
    around: str | None
    encodings: tuple[str, ...]


class Readings(NamedTuple):
    """A conversation read in plain words: the same conversation with its request read alone, in
    place and around its spans or pieces (``around`` is ``alone`` where nothing else is said, which
    weighs as nothing in :func:`encoded_risk`), and the names of what was undone."""

    alone: list[dict[str, str]]
    in_place: list[dict[str, str]]
    around: list[dict[str, str]]
    names: tuple[str, ...]


def plain_reading(text: str) -> PlainRequest | None:
    """``text`` with every encoded span decoded, or None when nothing in it reads as encoded."""
    pieces: list[Piece] = [(text, None)]
    for find in (_byte_spans("base64", _B64, _from_base64), _byte_spans("hex", _HEX, _from_hex), _letter_spans):
        pieces = _decoded(pieces, find)
    encodings = tuple(dict.fromkeys(kind for _, kind in pieces if kind is not None))
    if not encodings:
        return None
    marked = "".join(splits.MARK if kind is not None else t.replace(splits.MARK, " ") for t, kind in pieces)
    return PlainRequest("\n".join(t for t, kind in pieces if kind is not None), "".join(t for t, _ in pieces),
                        splits.said_around(marked, _asks_to_decode), encodings)


def _asks_to_decode(sentence: str) -> bool:
    """A sentence about the encoding is the wrapper's ("Here is a base64-encoded request."), as one
    asking to join pieces is a split request's: the head flags such sentences by themselves."""
    return bool(_ABOUT_ENCODING.search(sentence))


def _decoding(text: str) -> PlainRequest | None:
    read = plain_reading(text)
    if read is None or len(words_of(read.alone)) < MIN_DECODED_SHARE * len(words_of(read.in_place)):
        return None
    return read


def read_request(text: str) -> PlainRequest | None:
    """``text`` read in plain words: decoded, or else joined where it is a split request
    (:mod:`.splits`); None when it is neither. A decoding counts only when its spans are at least
    MIN_DECODED_SHARE of the words once read (a leetspeak line inside a long jailbreak template is
    not the request: read alone, it is a fragment, and the text as written is read)."""
    read = _decoding(text)
    if read is not None:
        return read
    whole = splits.read_text(text)
    return None if whole is None else PlainRequest(whole.alone, whole.in_place, whole.around, (splits.READING,))


def read_conversation(messages: Sequence[Mapping[str, str]]) -> Readings | None:
    """The conversation with its last user turn read in plain words (decoded spans alone, text with
    them in place, what it says around them), every other turn as it is. Where that turn does not
    read as encoded, the conversation read as a split request (:func:`.splits.read_conversation`,
    named ``joined``); None when it is neither.

    The last user turn only: an earlier turn was the request, and was read, when it came, and a chat
    whose earlier turn was encoded keeps its cached states (the readings are decoded in the same KV
    sequence, from where they first differ from the conversation)."""
    out = [{"role": m["role"], "content": m["content"]} for m in messages]
    last = next((i for i in range(len(out) - 1, -1, -1) if out[i]["role"] == "user"), None)
    if last is None:
        return None
    read = _decoding(out[last]["content"])
    if read is None:
        whole = splits.read_conversation(out)
        if whole is None:
            return None
        alone, in_place, around = whole
        return Readings(alone, in_place, around or [dict(m) for m in alone], (splits.READING,))
    alone, in_place, around = [dict(m) for m in out], [dict(m) for m in out], [dict(m) for m in out]
    alone[last]["content"], in_place[last]["content"] = read.alone, read.in_place
    around[last]["content"] = read.around if read.around is not None else read.alone
    return Readings(alone, in_place, around, read.encodings)


def encoded_risk(as_written: Any, alone: Any, in_place: Any, around: Any) -> Any:
    """The query check's risk for an encoded or split request: what it asks (its decoded spans or
    joined pieces alone) decides, or the whole text where it reads malicious as written and either
    made legible or in what it says around them: max(alone, min(as written, max(in place, around))).

    Alone, because the head flags the wrappers that ask for a decoding or a joining whatever they
    wrap; the whole text too, because it can carry a request of its own (a harmful question beside
    a harmless blob). As written, because illegible the head misreads it (it flagged 5 of 8 benign
    base64 twins). In place or around, because a harmless request made legible beside a harmful one
    dilutes it (in place alone, 24 of 60 harmful requests with a harmless base64 one appended stayed
    flagged, against 47 as written; with what is said around it, 37): README, "Split requests, read
    joined". NaN anywhere fails closed (NaN). Floats or numpy arrays, element-wise."""
    return np.maximum(alone, np.minimum(as_written, np.maximum(in_place, around)))
