"""llama.cpp's tokenizer and chat-template corpus, from llama-cpp-python's source distribution.

The sdist the Makefile builds carries llama.cpp's vocab-only GGUFs (one per
tokenizer family: Llama 3 BPE, Llama SPM, Qwen2, Phi-3, Gemma, Command-R, ...)
and real chat templates. The tests render every template and tokenize with
every vocabulary, so the sdist is downloaded once with ``pip download``
(pinned, sha256-checked), only those files are extracted into the cache, and
nothing of it is committed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from guardrail.errors import ArtifactError

from .wheels import cache_dir, sha256_file


@dataclass(frozen=True)
class SdistSource:
    """One pinned source distribution on PyPI, by its sha256."""

    package: str
    version: str
    sha256: str

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"


LLAMA_CPP_SDIST = SdistSource("llama-cpp-python", "0.3.36",
                              "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")

# Members we keep: <top>/vendor/llama.cpp/models/ggml-vocab-NAME.gguf and .../templates/NAME.jinja.
_MEMBER = re.compile(r"^[^/]+/vendor/llama\.cpp/models/(?:(ggml-vocab-[\w.-]+\.gguf)|templates/([\w.-]+\.jinja))$")


@dataclass(frozen=True)
class Corpus:
    """The extracted files: ``vocabs["llama-bpe"]`` and ``templates["google-gemma-2-2b-it"]`` are paths."""

    root: Path
    vocabs: dict[str, Path]
    templates: dict[str, Path]


def fetch_sdist(source: SdistSource = LLAMA_CPP_SDIST) -> Path:
    """Download the sdist once into the cache and return its verified path."""
    target = cache_dir() / "sdists" / f"{source.package}-{source.version}"
    for existing in sorted(target.glob("*.tar.gz")) if target.is_dir() else []:
        if sha256_file(existing) == source.sha256:
            return existing
        existing.unlink()
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(target), source.pin]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(target.glob("*.tar.gz"))
    if result.returncode != 0 or not archives:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no sdist downloaded"]
        raise ArtifactError(f"could not download the {source.pin} sdist from PyPI: {tail[0]}")
    actual = sha256_file(archives[0])
    if actual != source.sha256:
        archives[0].unlink()
        raise ArtifactError(f"the {source.pin} sdist has sha256 {actual}, expected {source.sha256}")
    return archives[0]


def corpus_dir(source: SdistSource = LLAMA_CPP_SDIST) -> Path:
    return cache_dir() / "corpus" / f"{source.package}-{source.version}"


def fetch_corpus(source: SdistSource = LLAMA_CPP_SDIST) -> Corpus:
    """The vocab-only GGUFs and chat templates, extracted once from the verified sdist."""
    root = corpus_dir(source)
    stamp = root / "sdist.sha256"
    if not (stamp.is_file() and stamp.read_text().strip() == source.sha256):
        _extract(fetch_sdist(source), root, source.sha256)
    vocabs = {p.name[len("ggml-vocab-"):-len(".gguf")]: p for p in sorted((root / "vocabs").glob("*.gguf"))}
    templates = {p.stem: p for p in sorted((root / "templates").glob("*.jinja"))}
    if not vocabs or not templates:
        raise ArtifactError(f"the {source.pin} sdist holds no vocab GGUFs or chat templates")
    return Corpus(root, vocabs, templates)


def _extract(archive: Path, root: Path, sha256: str) -> None:
    """Write the wanted members under a fresh directory, then swap it in (a crash leaves no half corpus)."""
    partial = root.with_name(root.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "vocabs").mkdir(parents=True)
    (partial / "templates").mkdir()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                match = _MEMBER.match(member.name)
                if not match or not member.isfile():
                    continue
                vocab, template = match.groups()
                dest = partial / "vocabs" / vocab if vocab else partial / "templates" / template
                with tar.extractfile(member) as src, open(dest, "wb") as out:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, out, 1 << 20)
    except (tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise ArtifactError(f"could not extract the corpus from {archive.name}: {exc}") from None
    (partial / "sdist.sha256").write_text(sha256 + "\n")
    shutil.rmtree(root, ignore_errors=True)
    partial.replace(root)
