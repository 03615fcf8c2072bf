"""Split requests read joined: a request sent in quoted pieces, for the query check to read whole.

Payload splitting sends a request in pieces the model is asked to put back together: halves over
two turns ("Part 1: ..."), string variables over several ("Let a = ..."), strings joined in code,
a list of its words. No piece reads as the request, so a head that reads the text as written
misses harmful ones, and it flags the wrapper whatever it wraps: as written, the Gemma head
flagged 14 of 40 benign split requests, and SmolLM2's only 21 of 40 harmful ones. So the query check
reads a split request joined as well (README, "Split requests, read joined"), weighed like an
encoded one (:func:`guardrail.runtime.encodings.encoded_risk`).

A reading needs an instruction to join in the last user turn and at least two quoted pieces in a
run of user turns ending there; pieces assigned to names (``a = "..."``) are joined in the order
the instruction names them. Nothing here depends on how an attack suite words its wrapper, and a
reading that is not a split request costs nothing: read alone its pieces are no request at all,
and the text as written is read as well. A pure function of the text: no model, no state.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

READING = "joined"  # the name ``CheckEvent.reading`` gives a split request read joined
MIN_PIECES = 2
MIN_WORDS = 3
MIN_SHARE = 0.15  # of the words of the turns that hold them: a few quoted phrases in a long template are no request

# a piece: in double or curly quotes, or in single quotes where code assigns it (s1 = 'how to'): prose
# uses the apostrophe too freely for single quotes to mark a piece anywhere else
_QUOTED = re.compile(r'"([^"\n]{1,500})"|\u201c([^\u201d\n]{1,500})\u201d|(?<=[=:]) ?\'([^\'\n]{1,500})\'')
_ASSIGNED = re.compile(r'\b([A-Za-z_]\w{0,15})\s*:?=\s*(?=["\u201c\'])')  # a name given the quoted piece after it
# the verb as an instruction (base form): "they were joined by Edward" asks nothing
_JOIN = re.compile(r"\b(?:join|combine|concat|concatenate|merge|assemble|glue|stitch|"
                   r"(?:put|bring|piece)\b[^.?!\n]{0,40}\btogether)\b", re.IGNORECASE)
_OPERAND = r"(\"\"|'[^'\n]{0,3}'|\b[A-Za-z_]\w*)"  # a name, or a short literal (a piece is emptied to "")
_PLUS = re.compile(_OPERAND + r"\s*\+\s*(?=" + _OPERAND + ")")  # a + b, s1 + " " + s2
_NAME = re.compile(r"[A-Za-z_]\w*")
_SENTENCE = re.compile(r"(?<=[.?!])\s+|\n+")
MARK = "\ue000"  # where a span or piece stood (a private-use character; one a user typed is made a space)


def said_around(marked: str, asks: Callable[[str], bool] = lambda sentence: False) -> str | None:
    """What a request says around its encoded spans or pieces (each marked with MARK): its sentences
    that hold none and do not ``ask`` for one to be decoded or joined; None under MIN_WORDS words.

    A harmful request written beside a harmless encoded or split one is in these sentences: read
    with the harmless one made legible beside it, the head reads the mix as benign (a benign
    question appended dilutes it), so the query check reads them apart too (``encodings.encoded_risk``)."""
    text = " ".join(" ".join(s for s in _SENTENCE.split(marked) if MARK not in s and not asks(s)).split())
    return text if len(text.split()) >= MIN_WORDS else None


def _asks_to_join(sentence: str) -> bool:
    return bool(_JOIN.search(sentence) or _PLUS.search(sentence))


def _marked(text: str) -> str:
    return _QUOTED.sub(MARK, text.replace(MARK, " "))


@dataclass(frozen=True)
class Pieces:
    """The quoted pieces of a run of user turns: each piece's text, and its name where code assigned it one."""

    texts: tuple[str, ...] = ()
    names: tuple[str | None, ...] = ()

    def __add__(self, other: Pieces) -> Pieces:
        return Pieces(self.texts + other.texts, self.names + other.names)


def pieces_of(text: str) -> Pieces:
    """The quoted pieces of a text in order, blank ones left out."""
    names_at = {m.end(): m.group(1) for m in _ASSIGNED.finditer(text)}
    texts, names = [], []
    for m in _QUOTED.finditer(text):
        k = next(i for i in (1, 2, 3) if m.group(i) is not None)
        piece = " ".join(m.group(k).split())
        if piece:
            texts.append(piece)
            names.append(names_at.get(m.start(k) - 1))  # keyed by where its opening quote is
    return Pieces(tuple(texts), tuple(names))


def instruction_of(text: str) -> str:
    """What a turn says around its pieces: quotes emptied and assignments dropped, so that neither a
    word inside a piece nor the name an assignment gives reads as the instruction."""
    return _ASSIGNED.sub(" ", _QUOTED.sub('""', text))


def joined(pieces: Pieces, turn: str, words: int) -> str | None:
    """The pieces joined as the turn asks: in the order it names them where it names at least two,
    else in the order they came; None when it does not ask to join, or when they are too little to
    read (under MIN_WORDS, or under MIN_SHARE of the ``words`` of the turns that hold them)."""
    instruction = instruction_of(turn)
    by_name = {n: t for n, t in zip(pieces.names, pieces.texts) if n is not None}
    plus = any(x in by_name or x[:1] in "\"'" for pair in _PLUS.findall(instruction) for x in pair)
    if len(pieces.texts) < MIN_PIECES or not (plus or _JOIN.search(instruction)):
        return None
    named = list(dict.fromkeys(w for w in _NAME.findall(instruction) if w in by_name))
    order = [by_name[n] for n in named] if len(named) >= MIN_PIECES else list(pieces.texts)
    text = " ".join(order)
    n = len(text.split())
    return text if n >= MIN_WORDS and n >= MIN_SHARE * words else None


@dataclass(frozen=True)
class JoinedRequest:
    """A split request read whole, three ways: its pieces joined alone (what it asks), its text with
    the joined request after it (what it says, with the request legible), and what it says around
    the pieces (``said_around``; None when that is next to nothing)."""

    alone: str
    in_place: str
    around: str | None


def read_text(text: str) -> JoinedRequest | None:
    """One text (a prompt, or a single turn) read as a split request; None when it is not one."""
    whole = joined(pieces_of(text), text, len(text.split()))
    if whole is None:
        return None
    return JoinedRequest(whole, f'{text}\n"{whole}"', said_around(_marked(text), _asks_to_join))


def read_conversation(messages: Sequence[Mapping[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]],
                                                                       list[dict[str, str]] | None] | None:
    """The conversation read as a split request: (its pieces joined alone, in place of the turns that
    held them; the conversation with the joined request after its last user turn; what those turns
    say around the pieces, in their place, or None when that is next to nothing); a final prefill
    stays in each. None when its last user turn does not ask to join pieces. The pieces come from
    the run of user turns that each hold one, ending with the last: a quote from a turn long before
    is not a piece."""
    out = [{"role": m["role"], "content": m["content"]} for m in messages]
    users = [i for i, m in enumerate(out) if m["role"] == "user"]
    if not users:
        return None
    last = users[-1]
    run = [last]  # the user turns holding pieces, from the last back to the first without any
    found = [pieces_of(out[last]["content"])]
    for i in reversed(users[:-1]):
        got = pieces_of(out[i]["content"])
        if not got.texts:
            break
        run.insert(0, i)
        found.insert(0, got)
    first = run[0]
    words = sum(len(out[i]["content"].split()) for i in run)
    whole = joined(sum(found, Pieces()), out[last]["content"], words)
    if whole is None:
        return None
    alone = out[:first] + [{"role": "user", "content": whole}] + out[last + 1:]
    in_place = [dict(m) for m in out]
    in_place[last]["content"] = f'{out[last]["content"]}\n"{whole}"'
    said = said_around("\n".join(_marked(out[i]["content"]) for i in run), _asks_to_join)
    around = None if said is None else out[:first] + [{"role": "user", "content": said}] + out[last + 1:]
    return alone, in_place, around
