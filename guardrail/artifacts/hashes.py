"""A model file's sha256, without hashing it again: how heads are found for big models.

A head is found by the sha256 of its model file, and a model is gigabytes, so
the sha256 is hashed at most once per file: an Ollama blob is named by its
sha256 (Ollama checks the digest when it pulls), and any other file's sha256 is
kept in ``<cache>/fingerprints.json`` under (absolute path, size, mtime_ns), so
touching or replacing the file invalidates it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .wheels import cache_dir, sha256_file

OLLAMA_BLOB = re.compile(r"sha256-([0-9a-f]{64})")


def fingerprint_cache() -> Path:
    return cache_dir() / "fingerprints.json"


def ollama_blob_sha256(path: str | os.PathLike[str]) -> str | None:
    """The sha256 an Ollama blob's name states (``.../blobs/sha256-<hex>``), or None for any other file."""
    file = Path(path).resolve()
    match = OLLAMA_BLOB.fullmatch(file.name)
    return match.group(1) if match and file.parent.name == "blobs" else None


def _read_cache(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache: Path, entries: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file; an unwritable cache only costs a re-hash next time."""
    partial = cache.with_name(f"{cache.name}.{os.getpid()}.part")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(entries, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(partial, cache)
    except OSError:
        partial.unlink(missing_ok=True)


def known_sha256(path: str | os.PathLike[str]) -> str | None:
    """The file's sha256 if it is known without reading the file (its name, or the cache), else None.

    Raises OSError when the file cannot be stat'ed."""
    file = Path(path).resolve()
    stat = file.stat()
    named = ollama_blob_sha256(file)
    if named:
        return named
    entry = _read_cache(fingerprint_cache()).get(str(file))
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns \
            and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    return None


def model_sha256(path: str | os.PathLike[str]) -> str:
    """The file's sha256: known (see :func:`known_sha256`), else hashed once and cached.

    Raises OSError when the file cannot be read."""
    file = Path(path).resolve()
    known = known_sha256(file)
    if known:
        return known
    stat = file.stat()
    digest = sha256_file(file)
    cache = fingerprint_cache()
    entries = _read_cache(cache)  # read again: another process may have added entries meanwhile
    entries[str(file)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    _write_cache(cache, entries)
    return digest
