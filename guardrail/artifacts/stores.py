"""The stores people already keep GGUF models in: Ollama, the Hugging Face cache, LM Studio.

``--model`` reaches a model in any of them by the name its store knows it by:

- ``ollama:NAME[:TAG]`` (also ``NAMESPACE/NAME`` and ``HOST/NAMESPACE/NAME``): the manifest
  under ``$OLLAMA_MODELS`` (else ``~/.ollama/models``) is read to its model layer
  (``application/vnd.ollama.image.model``), a blob named by its sha256.
- ``hf:ORG/REPO[@REV][/FILE | :QUANT]``: the local Hugging Face cache (``$HF_HUB_CACHE``,
  else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), the revision ``refs/main``
  names unless ``@REV`` says; read with huggingface_hub's own ``scan_cache_dir`` when that
  package is installed, else from the documented layout. Nothing is downloaded unless
  asked (:func:`download_hf`, behind ``guardrail fetch``).
- ``lmstudio:PUBLISHER/REPO[/FILE | :QUANT]``: LM Studio's models folder
  (``$LMSTUDIO_MODELS``, else ``~/.lmstudio/models`` and the older ``~/.cache/lm-studio/models``).

A repository holding several GGUFs needs FILE or QUANT unless only one is there; a
split GGUF (``-00001-of-00003.gguf``) is reached through its first part, which is
what llama.cpp loads. Every failure is one :class:`ModelError` line naming where it looked.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from guardrail.errors import ModelError

SCHEMES = ("ollama", "hf", "lmstudio")
SPEC_FORMS = "ollama:NAME[:TAG], hf:ORG/REPO[/FILE], lmstudio:PUBLISHER/REPO[/FILE]"
OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
SPLIT = re.compile(r"(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf", re.IGNORECASE)
SHOWN = 8  # candidates named in one error line


@dataclass(frozen=True)
class StoredModel:
    """A GGUF model found in a store: what ``--model`` takes to reach it, and its files."""

    spec: str
    store: str  # guardrail | ollama | hf | lmstudio
    path: Path  # the file llama.cpp loads (a split model's first part)
    parts: tuple[Path, ...]  # every file of the model (one unless split)


def split_spec(spec: str) -> tuple[str, str] | None:
    """(scheme, rest) of a store name such as ``ollama:llama3.2:1b``; None for a path or a known name."""
    scheme, sep, rest = spec.partition(":")
    return (scheme, rest) if sep and scheme in SCHEMES else None


def resolve_stored(spec: str) -> Path:
    """The GGUF file a store name reaches (the first part of a split model)."""
    found = split_spec(spec)
    if found is None or not found[1]:
        raise ModelError(f"{spec!r} is not a model name a store knows; the forms are {SPEC_FORMS}")
    scheme, rest = found
    resolver: dict[str, Callable[[str], Path]] = {"ollama": resolve_ollama, "hf": resolve_hf,
                                                  "lmstudio": resolve_lmstudio}
    return resolver[scheme](rest)


def stored_models() -> list[StoredModel]:
    """Every GGUF model in Ollama, the Hugging Face cache and LM Studio, in that order."""
    return ollama_models() + hf_models() + lmstudio_models()


def _where(env: str | Sequence[str], path: Path | str) -> str:
    """Which root was searched and why: the variable that set it, or the default."""
    names = [env] if isinstance(env, str) else list(env)
    chosen = next((n for n in names if os.environ.get(n)), None)
    return f"{path} (from ${chosen})" if chosen else f"{path} (the default; ${names[0]} overrides)"


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "") if items else "none"


# ---- choosing a GGUF among a repository's files ----------------------------------------------

def first_part(name: str) -> str:
    """A split GGUF's first part for any of its parts (llama.cpp loads the rest from it); else the name."""
    match = SPLIT.fullmatch(PurePosixPath(name).name)
    if not match:
        return name
    first = f"{match['stem']}-{1:05d}-of-{match['count']}.gguf"
    return str(PurePosixPath(name).with_name(first))


def split_names(name: str) -> list[str]:
    """Every part's name of a split GGUF (from any part's name); ``[name]`` for a single file."""
    match = SPLIT.fullmatch(PurePosixPath(name).name)
    if not match:
        return [name]
    count = int(match["count"])
    return [str(PurePosixPath(name).with_name(f"{match['stem']}-{i:05d}-of-{match['count']}.gguf"))
            for i in range(1, count + 1)]


def model_parts(path: Path) -> tuple[Path, ...]:
    """The files of the model at ``path``: its split parts that are present, or the file alone."""
    names = split_names(path.name)
    return tuple(p for p in (path.with_name(n) for n in names) if p.exists()) if len(names) > 1 else (path,)


def loadable_ggufs(files: Iterable[str]) -> list[str]:
    """The GGUFs a model loads from: single files and split models' first parts; projectors left out."""
    out = []
    for name in sorted(set(files)):
        base = PurePosixPath(name).name.lower()
        if not base.endswith(".gguf") or base.startswith("mmproj"):
            continue
        if first_part(name) == name:
            out.append(name)
    return out


def _has_quant(name: str, quant: str) -> bool:
    """Whether a file name carries a quantization tag (``Q4_K_M`` does not match ``Q4_K``)."""
    pattern = rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])"
    return re.search(pattern, PurePosixPath(name).name, re.IGNORECASE) is not None


def choose_gguf(label: str, files: Iterable[str], wanted: str | None, quant: str | None,
                spec_of: Callable[[str], str]) -> str:
    """The one GGUF a name means among a repository's files: the one named, the one of a quant, or the
    only one; several left is an error that names them (never a guess)."""
    candidates = loadable_ggufs(files)
    if wanted:
        wanted = first_part(wanted)
        picked = [f for f in candidates if f == wanted] or \
            [f for f in candidates if PurePosixPath(f).name == PurePosixPath(wanted).name]
        if not picked:
            raise ModelError(f"{label} has no GGUF {wanted}; it has: {_listing([spec_of(f) for f in candidates])}")
        candidates = picked
    elif quant:
        picked = [f for f in candidates if _has_quant(f, quant)]
        if not picked:
            raise ModelError(f"{label} has no {quant} GGUF; it has: {_listing([spec_of(f) for f in candidates])}")
        candidates = picked
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelError(f"{label} holds no GGUF model file")
    raise ModelError(f"{label} holds {len(candidates)} GGUF models; name one: "
                     f"{_listing([spec_of(f) for f in candidates])}")


def _parse_repo(scheme: str, rest: str) -> tuple[str, str | None, str | None, str | None]:
    """``OWNER/REPO[@REV][/FILE | :QUANT]`` -> (owner/repo, revision, file, quant)."""
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ModelError(f"{scheme}:{rest} names no repository; the form is {scheme}:OWNER/REPO[/FILE]")
    repo, file = parts[1], "/".join(parts[2:]) or None
    quant = None
    if file is None and ":" in repo:
        repo, quant = repo.split(":", 1)
    repo, _, revision = repo.partition("@")
    return f"{parts[0]}/{repo}", revision or None, file, quant or None


# ---- Ollama ----------------------------------------------------------------------------------

def ollama_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def _ollama_reference(name: str) -> tuple[tuple[str, str, str], str]:
    """``[HOST/][NAMESPACE/]NAME[:TAG]`` -> ((host, namespace, name), tag), Ollama's defaults filled in."""
    path, tag = name.rsplit(":", 1) if ":" in name.rsplit("/", 1)[-1] else (name, "latest")
    parts = path.split("/")
    full = {1: [OLLAMA_REGISTRY, "library", *parts], 2: [OLLAMA_REGISTRY, *parts], 3: parts}.get(len(parts))
    if not full or not all(full) or not tag:
        raise ModelError(f"ollama:{name} is not an Ollama model name: NAME[:TAG], NAMESPACE/NAME[:TAG] "
                         "or HOST/NAMESPACE/NAME[:TAG]")
    return (full[0], full[1], full[2]), tag


def ollama_name(host: str, namespace: str, model: str, tag: str) -> str:
    """The shortest ``ollama:`` name Ollama itself would show for a manifest."""
    if host != OLLAMA_REGISTRY:
        return f"ollama:{host}/{namespace}/{model}:{tag}"
    return f"ollama:{model}:{tag}" if namespace == "library" else f"ollama:{namespace}/{model}:{tag}"


def _ollama_model_digest(manifest: Path) -> str:
    """The sha256 of a manifest's model layer (Ollama uses the last one when there are several)."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelError(f"{manifest} is not a readable Ollama manifest") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    digests = [layer.get("digest") for layer in layers if isinstance(layer, dict)
               and layer.get("mediaType") == OLLAMA_MODEL_LAYER] if isinstance(layers, list) else []
    match = re.fullmatch(r"sha256:([0-9a-f]{64})", str(digests[-1])) if digests else None
    if not match:
        raise ModelError(f"the Ollama manifest {manifest} has no GGUF model layer ({OLLAMA_MODEL_LAYER}); "
                         "guardrail runs GGUF models only")
    return match.group(1)


def _ollama_manifests(root: Path) -> list[tuple[tuple[str, str, str, str], Path]]:
    """Every manifest in the store: ((host, namespace, name, tag), path)."""
    base = root / "manifests"
    found = [p for p in base.glob("*/*/*/*") if p.is_file()] if base.is_dir() else []
    return [(tuple(p.relative_to(base).parts), p) for p in sorted(found)]  # type: ignore[misc]


def resolve_ollama(name: str) -> Path:
    """The blob an Ollama name's manifest names as its model layer."""
    root = ollama_root()
    (host, namespace, model), tag = _ollama_reference(name)
    wanted = root / "manifests" / host / namespace / model / tag
    lowered = root / "manifests" / host.lower() / namespace.lower() / model.lower() / tag.lower()
    manifest = next((m for m in (wanted, lowered) if m.is_file()), None)
    if manifest is None:
        have = [ollama_name(*ref) for ref, _ in _ollama_manifests(root)]
        raise ModelError(f"no Ollama model {ollama_name(host, namespace, model, tag)}: no manifest {wanted} "
                         f"(store {_where('OLLAMA_MODELS', root)}); it has: {_listing(have)}")
    blob = root / "blobs" / f"sha256-{_ollama_model_digest(manifest)}"
    if not blob.is_file():
        raise ModelError(f"{ollama_name(host, namespace, model, tag)}: its model layer {blob} is missing "
                         f"(named by {manifest}); `ollama pull {ollama_name(host, namespace, model, tag)[7:]}` "
                         "fetches it again")
    return blob


def ollama_models() -> list[StoredModel]:
    """Every Ollama model whose GGUF blob is present (a manifest without one is not a model here)."""
    root, out = ollama_root(), []
    for ref, manifest in _ollama_manifests(root):
        try:
            blob = root / "blobs" / f"sha256-{_ollama_model_digest(manifest)}"
        except ModelError:
            continue
        if blob.is_file():
            out.append(StoredModel(ollama_name(*ref), "ollama", blob, (blob,)))
    return out


def ollama_label(path: Path) -> str | None:
    """What to call an Ollama blob in output (``ollama:llama3.2:1b``), since its file name means nothing
    to a user; None for any other file."""
    match = re.fullmatch(r"sha256-([0-9a-f]{64})", path.name)
    return next(iter(ollama_names_for(match.group(1))), None) if match and path.parent.name == "blobs" else None


def ollama_names_for(sha256: str) -> list[str]:
    """The Ollama names whose model layer is this sha256 (how a blob is called in a message)."""
    names = []
    for ref, manifest in _ollama_manifests(ollama_root()):
        try:
            if _ollama_model_digest(manifest) == sha256:
                names.append(ollama_name(*ref))
        except ModelError:
            continue
    return names


# ---- the Hugging Face cache --------------------------------------------------------------------

HF_ENV = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


def hf_cache_root() -> Path:
    """The hub cache huggingface_hub uses: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


@dataclass(frozen=True)
class HFRepo:
    """One model repository in the cache: its refs and each cached revision's GGUF files."""

    repo_id: str
    path: Path  # <cache>/models--ORG--REPO
    refs: dict[str, str]  # ref name -> commit
    snapshots: dict[str, tuple[str, ...]]  # commit -> GGUF files, relative posix paths


def _repo_dir(root: Path, repo_id: str) -> Path:
    return root / ("models--" + repo_id.replace("/", "--"))


def _read_repo_layout(repo_dir: Path, repo_id: str) -> HFRepo:
    """A repository read from the cache's documented layout (refs/, snapshots/<commit>/...)."""
    refs_dir, snap_dir = repo_dir / "refs", repo_dir / "snapshots"
    refs = {ref.relative_to(refs_dir).as_posix(): ref.read_text(encoding="utf-8").strip()
            for ref in sorted(refs_dir.rglob("*")) if ref.is_file()} if refs_dir.is_dir() else {}
    snapshots = {
        snap.name: tuple(sorted(f.relative_to(snap).as_posix() for f in snap.rglob("*")
                                if f.name.lower().endswith(".gguf") and f.is_file()))
        for snap in sorted(snap_dir.iterdir()) if snap.is_dir()} if snap_dir.is_dir() else {}
    return HFRepo(repo_id, repo_dir, refs, snapshots)


def _scan_with_hub(root: Path) -> dict[str, HFRepo] | None:
    """The cache's model repositories through huggingface_hub's own scanner; None when it is not installed."""
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError:
        return None
    repos = {}
    for repo in scan_cache_dir(root).repos:
        if repo.repo_type != "model":
            continue
        refs = {ref: rev.commit_hash for rev in repo.revisions for ref in rev.refs}
        snapshots = {rev.commit_hash: tuple(sorted(Path(f.file_path).relative_to(rev.snapshot_path).as_posix()
                                                   for f in rev.files if f.file_name.lower().endswith(".gguf")))
                     for rev in repo.revisions}
        repos[repo.repo_id] = HFRepo(repo.repo_id, Path(repo.repo_path), refs, snapshots)
    return repos


def hf_repos() -> dict[str, HFRepo]:
    """Every model repository in the cache (one the hub's scanner calls corrupt is read from the layout)."""
    root = hf_cache_root()
    if not root.is_dir():
        return {}
    dirs = {p.name[len("models--"):].replace("--", "/"): p for p in sorted(root.glob("models--*--*")) if p.is_dir()}
    scanned = _scan_with_hub(root) or {}
    return {repo_id: scanned.get(repo_id) or _read_repo_layout(path, repo_id) for repo_id, path in dirs.items()}


def _hf_repo(repo_id: str) -> HFRepo:
    root = hf_cache_root()
    repos = hf_repos()
    same = [r for r in repos.values() if r.repo_id.lower() == repo_id.lower()]
    if repo_id in repos or len(same) == 1:
        return repos.get(repo_id) or same[0]
    raise ModelError(f"hf:{repo_id} is not in the Hugging Face cache: no {_repo_dir(root, repo_id)} (cache "
                     f"{_where(HF_ENV, root)}); `guardrail fetch --model hf:{repo_id}/FILE.gguf` downloads it "
                     "(needs huggingface_hub and network)")


def _hf_revision(repo: HFRepo, revision: str | None) -> str:
    """The cached commit a name means: @REV (a ref or a commit prefix), else refs/main, else the only one."""
    label = f"hf:{repo.repo_id}"
    if revision:
        commit = repo.refs.get(revision, revision)
        found = [c for c in repo.snapshots if c == commit or (len(commit) >= 7 and c.startswith(commit))]
        if len(found) == 1:
            return found[0]
        raise ModelError(f"{label} has no cached revision {revision}; cached: {_listing(sorted(repo.snapshots))}")
    main = repo.refs.get("main")
    if main in repo.snapshots:
        return str(main)
    if len(repo.snapshots) == 1:
        return next(iter(repo.snapshots))
    choices = [f"{label}@{c[:12]}" for c in sorted(repo.snapshots)]
    raise ModelError(f"{label}: refs/main names no cached revision and {len(choices)} are cached "
                     f"({repo.path / 'snapshots'}); name one: {_listing(choices)}")


def resolve_hf(rest: str) -> Path:
    """A file of a cached Hugging Face repository, as its snapshot path (split parts sit beside it)."""
    repo_id, revision, file, quant = _parse_repo("hf", rest)
    repo = _hf_repo(repo_id)
    commit = _hf_revision(repo, revision)
    at = f"@{revision}" if revision else ""
    chosen = choose_gguf(f"hf:{repo.repo_id}{at} ({repo.path / 'snapshots' / commit})", repo.snapshots[commit],
                         file, quant, lambda f: f"hf:{repo.repo_id}{at}/{f}")
    return repo.path / "snapshots" / commit / chosen


def hf_models() -> list[StoredModel]:
    """Every GGUF model in the cache: refs/main's revision first, a file another revision holds too once."""
    out, seen = [], set()
    for repo in hf_repos().values():
        main = repo.refs.get("main")
        for commit in sorted(repo.snapshots, key=lambda c: (c != main, c)):
            at = "" if commit == main or len(repo.snapshots) == 1 else f"@{commit[:12]}"
            for name in loadable_ggufs(repo.snapshots[commit]):
                path = repo.path / "snapshots" / commit / name
                if path.resolve() not in seen:
                    seen.add(path.resolve())
                    out.append(StoredModel(f"hf:{repo.repo_id}{at}/{name}", "hf", path, model_parts(path)))
    return out


def download_hf(rest: str) -> Path:
    """Download a GGUF (every part of a split one) into the Hugging Face cache: only when a user asks."""
    repo_id, revision, file, quant = _parse_repo("hf", rest)
    try:
        import huggingface_hub
    except ImportError:
        raise ModelError(f"downloading hf:{rest} needs the huggingface_hub package and network access "
                         "(pip install huggingface_hub), or download it yourself and pass its path") from None
    label = f"hf:{repo_id}"
    try:
        if file is None:
            files = huggingface_hub.list_repo_files(repo_id, revision=revision)
            file = choose_gguf(label, files, None, quant, lambda f: f"{label}/{f}")
        for name in split_names(first_part(file)):
            huggingface_hub.hf_hub_download(repo_id, name, revision=revision, cache_dir=hf_cache_root())
    except ModelError:
        raise
    except Exception as exc:  # the hub raises many types (HTTP, offline, not found); all mean the same here
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelError(f"could not download {label}/{file or ''} from the Hugging Face Hub: {reason}") from None
    return resolve_hf(f"{repo_id}{'@' + revision if revision else ''}/{file}")


# ---- LM Studio -------------------------------------------------------------------------------

def lmstudio_roots() -> list[Path]:
    """$LMSTUDIO_MODELS alone, else LM Studio's folder (~/.lmstudio/models) and its older one."""
    explicit = os.environ.get("LMSTUDIO_MODELS")
    if explicit:
        return [Path(explicit).expanduser()]
    return [Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"]


def _ggufs_under(folder: Path) -> list[str]:
    return sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*.gguf") if f.is_file())


def resolve_lmstudio(rest: str) -> Path:
    """A GGUF of an LM Studio model folder (PUBLISHER/REPO), from the first models folder that has it."""
    repo_id, revision, file, quant = _parse_repo("lmstudio", rest)
    if revision:
        raise ModelError(f"lmstudio:{rest}: LM Studio keeps no revisions; the form is lmstudio:PUBLISHER/REPO[/FILE]")
    roots = lmstudio_roots()
    for root in roots:
        folder = root / repo_id
        if folder.is_dir():
            chosen = choose_gguf(f"lmstudio:{repo_id} ({folder})", _ggufs_under(folder), file, quant,
                                 lambda f: f"lmstudio:{repo_id}/{f}")
            return folder / chosen
    have = [m.spec for m in lmstudio_models()]
    raise ModelError(f"no LM Studio model {repo_id}: looked in {', '.join(str(r / repo_id) for r in roots)} "
                     f"(models folder {_where('LMSTUDIO_MODELS', roots[0])}); it has: {_listing(have)}")


def lmstudio_models() -> list[StoredModel]:
    """Every GGUF model in LM Studio's models folders (PUBLISHER/REPO/FILE.gguf)."""
    out: dict[str, StoredModel] = {}
    for root in lmstudio_roots():
        for folder in sorted(p for p in root.glob("*/*") if p.is_dir()) if root.is_dir() else []:
            repo_id = folder.relative_to(root).as_posix()
            for name in loadable_ggufs(_ggufs_under(folder)):  # a name in both folders: the one it resolves to
                out.setdefault(f"lmstudio:{repo_id}/{name}", StoredModel(
                    f"lmstudio:{repo_id}/{name}", "lmstudio", folder / name, model_parts(folder / name)))
    return list(out.values())
