"""A GGUF file's header, read fast: its metadata and its tensor list, never its weights.

``gguf.GGUFReader`` turns every element of every metadata array into numpy views,
which takes seconds for a large vocabulary (12 s for Gemma 3's 262,144 tokens, 2.5 s
for SmolLM2's 49,152, on this machine); listing models needs a few scalar keys, so
this reader steps over arrays by their lengths (Gemma 3's header: well under a
second). The format's constants (magic, value types, alignment, quantization block
sizes) come from the ``gguf`` package, so both readers agree on what a GGUF is.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import gguf

_T = gguf.GGUFValueType
SCALARS: dict[int, str] = {_T.UINT8: "B", _T.INT8: "b", _T.UINT16: "H", _T.INT16: "h", _T.UINT32: "I", _T.INT32: "i",
                           _T.FLOAT32: "f", _T.BOOL: "?", _T.UINT64: "Q", _T.INT64: "q", _T.FLOAT64: "d"}


class GGUFHeaderError(ValueError):
    """The bytes are not a complete GGUF header (or its tensors run past the end of the file)."""


@dataclass(frozen=True)
class Array:
    """A metadata array, kept as its element type and length only."""

    type: int
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    fields: dict[str, Any]  # scalars and strings as values, arrays as Array
    tensors: tuple[TensorInfo, ...]


class _Cursor:
    """Reads the header's little (or big) endian values from a buffer, checking every bound."""

    def __init__(self, buf: mmap.mmap, endian: str, pos: int) -> None:
        self.buf, self.endian, self.pos = buf, endian, pos

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFHeaderError("the header is truncated")
        (value,) = struct.unpack_from(self.endian + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        end = self.pos + length
        if end > len(self.buf):
            raise GGUFHeaderError("the header is truncated")
        text = self.buf[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, kind: int) -> Any:
        if kind == _T.STRING:
            return self.string()
        if kind == _T.ARRAY:
            item, count = self.scalar("I"), self.scalar("Q")
            self.skip(item, count)
            return Array(item, count)
        if kind not in SCALARS:
            raise GGUFHeaderError(f"unknown metadata value type {kind}")
        return self.scalar(SCALARS[kind])

    def skip(self, item: int, count: int) -> None:
        """Step over an array's elements: fixed-size ones at once, strings by their lengths."""
        if item in SCALARS:
            self.pos += count * struct.calcsize(SCALARS[item])
        elif item == _T.STRING:
            unpack, buf, pos, fmt = struct.unpack_from, self.buf, self.pos, self.endian + "Q"
            for _ in range(count):
                pos += 8 + unpack(fmt, buf, pos)[0]  # struct.error past the end: caught by read_header
            self.pos = pos
        else:
            for _ in range(count):
                self.value(item)
        if self.pos > len(self.buf):
            raise GGUFHeaderError("the header is truncated")


def _tensor(cursor: _Cursor) -> TensorInfo:
    name = cursor.string()
    shape = tuple(cursor.scalar("Q") for _ in range(cursor.scalar("I")))
    return TensorInfo(name, cursor.scalar("I"), shape, cursor.scalar("Q"))


def _check_tensor_data(header: GGUFHeader, header_end: int, size: int) -> None:
    """Every tensor's bytes lie inside the file (a truncated download fails here, not in llama.cpp)."""
    alignment = header.fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    start = -(-header_end // alignment) * alignment if isinstance(alignment, int) and alignment > 0 else header_end
    for tensor in header.tensors:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor.type)]
        except (KeyError, ValueError):
            continue  # a type this gguf package does not know: its size cannot be checked
        if start + tensor.offset + prod(tensor.shape) // block * type_size > size:
            raise GGUFHeaderError(f"tensor {tensor.name} runs past the end of the file (truncated)")


def read_header(path: str | Path) -> GGUFHeader:
    """The header of a GGUF file. Raises OSError when it cannot be read, GGUFHeaderError when it is not GGUF."""
    with open(path, "rb") as handle:
        if handle.seek(0, 2) < 24:
            raise GGUFHeaderError("the file is too short to be GGUF")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if struct.unpack_from("<I", buf, 0)[0] != gguf.GGUF_MAGIC:
                raise GGUFHeaderError("no GGUF magic")
            version = struct.unpack_from("<I", buf, 4)[0]
            endian = ">" if version & 0xFFFF == 0 else "<"  # a big-endian file, as gguf's reader tells it
            cursor = _Cursor(buf, endian, 4)
            version = cursor.scalar("I")
            if version < 2:
                raise GGUFHeaderError(f"GGUF version {version} is older than llama.cpp reads")
            n_tensors, n_fields = cursor.scalar("Q"), cursor.scalar("Q")
            try:
                fields = {cursor.string(): cursor.value(cursor.scalar("I")) for _ in range(n_fields)}
                header = GGUFHeader(version, fields, tuple(_tensor(cursor) for _ in range(n_tensors)))
            except struct.error:
                raise GGUFHeaderError("the header is truncated") from None
            _check_tensor_data(header, cursor.pos, len(buf))
    return header
