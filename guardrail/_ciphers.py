"""The letter ciphers, written once: training writes requests in them (``training.data.transforms``)
and the query check reads requests out of them (``runtime.encodings``). Plain Python, no llama.cpp."""

from __future__ import annotations

_LOWER, _UPPER = "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _rotation(k: int) -> dict[int, int]:
    return str.maketrans(_LOWER + _UPPER, _LOWER[k:] + _LOWER[:k] + _UPPER[k:] + _UPPER[:k])


_SHIFTS = {k: _rotation(k) for k in range(26)}
_ATBASH = str.maketrans(_LOWER + _UPPER, _LOWER[::-1] + _UPPER[::-1])


def caesar(text: str, shift: int = 3) -> str:
    """Letters shifted ``shift`` places along the alphabet (ROT13 is the shift of 13; a negative
    shift undoes a positive one); anything but a-z and A-Z as it is."""
    return text.translate(_SHIFTS[shift % 26])


def atbash(text: str) -> str:
    """Each letter mirrored in the alphabet (a<->z, b<->y): its own inverse."""
    return text.translate(_ATBASH)
