"""The models people already have, found and guarded by name: Ollama, the Hugging Face cache, LM Studio.

Every store here is a fake one under tmp_path (its root set through the store's own
environment variable, HOME pointed at tmp_path too), holding small GGUF files written
with the gguf package; no model process is started and no real home directory is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import gguf
import numpy as np
import pytest

import guardrail  # noqa: F401  (llama.cpp before numpy)
from guardrail.artifacts import hashes, stores
from guardrail.artifacts.catalog import list_models
from guardrail.artifacts.heads import find_head, user_head_path
from guardrail.artifacts.models import KNOWN_MODELS, fetch_any, resolve_model
from guardrail.errors import HeadError, ModelError
from guardrail.head import fingerprint_file

ROOT = Path(__file__).resolve().parents[1]
Q4_K_M, Q8_0 = int(gguf.LlamaFileType.MOSTLY_Q4_K_M), int(gguf.LlamaFileType.MOSTLY_Q8_0)


def write_gguf(path: Path, name: str, *, arch: str = "llama", file_type: int | None = Q4_K_M,
               kind: str | None = None, tensors: bool = True) -> str:
    """A small GGUF with a chat model's header keys and one tiny tensor; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_context_length(64)
    if file_type is not None:
        writer.add_file_type(file_type)
    if kind:
        writer.add_type(kind)
    writer.add_chat_template("{{ messages }}")
    writer.add_token_list(["<s>", "</s>", name])
    if tensors:
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every store root and guardrail's cache under tmp_path; the real home directories are never read."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GUARDRAIL_CACHE", str(tmp_path / "guardrail-cache"))
    for var in ("OLLAMA_MODELS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME",
                "LMSTUDIO_MODELS"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def no_hashing(monkeypatch):
    """Any attempt to hash a model file fails the test: heads must be found by names and the cache."""
    def refuse(path, *args, **kwargs):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(hashes, "sha256_file", refuse)


def plant_head(sha: str) -> Path:
    """A head file where `guardrail train` saves one for the model with this sha256."""
    head = user_head_path(sha)
    head.parent.mkdir(parents=True, exist_ok=True)
    head.write_bytes(b"GGUF")
    return head


# ---- Ollama ----------------------------------------------------------------------------------

def ollama_blob(root: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / f"sha256-{digest}").write_bytes(data)
    return digest


def ollama_manifest(root: Path, parts: tuple[str, str, str], tag: str, model_digest: str, config: str) -> Path:
    """A manifest as Ollama writes one: schemaVersion 2, a config layer, the model layer, a template layer."""
    layer = {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{model_digest}", "size": 1}
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": f"sha256:{config}",
                   "size": 2},
        "layers": [layer, {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{config}",
                           "size": 2}],
    }
    path = root / "manifests" / Path(*parts) / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture
def ollama(tmp_path, monkeypatch):
    """A store with tinyllama:latest and tinyllama:1b, a namespaced model, one pulled from hf.co, and
    a tag whose model blob is gone."""
    root = tmp_path / "ollama-models"
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    staging = tmp_path / "staging"
    models = {}
    for key, parts, tag in [("latest", ("registry.ollama.ai", "library", "tinyllama"), "latest"),
                            ("1b", ("registry.ollama.ai", "library", "tinyllama"), "1b"),
                            ("namespaced", ("registry.ollama.ai", "someone", "tuned"), "q4"),
                            ("hf", ("hf.co", "org", "repo-GGUF"), "Q4_K_M")]:
        write_gguf(staging / f"{key}.gguf", f"ollama {key}")
        digest = ollama_blob(root, (staging / f"{key}.gguf").read_bytes())
        models[key] = digest
        ollama_manifest(root, parts, tag, digest, ollama_blob(root, b'{"model_format":"gguf"}'))
    ollama_manifest(root, ("registry.ollama.ai", "library", "gone"), "latest", "f" * 64,
                    ollama_blob(root, b"{}"))
    return root, models


@pytest.mark.parametrize("name, key", [
    ("ollama:tinyllama", "latest"), ("ollama:tinyllama:latest", "latest"), ("ollama:tinyllama:1b", "1b"),
    ("ollama:someone/tuned:q4", "namespaced"), ("ollama:hf.co/org/repo-GGUF:Q4_K_M", "hf"),
])
def test_an_ollama_name_resolves_through_its_manifest_to_the_model_layer(ollama, name, key):
    root, models = ollama
    assert resolve_model(name) == root / "blobs" / f"sha256-{models[key]}"


def test_an_ollama_model_finds_its_head_by_the_blob_name_without_hashing(ollama, no_hashing):
    _, models = ollama
    blob = resolve_model("ollama:tinyllama:1b")
    fingerprint = fingerprint_file(blob, "llama", 8, 2)
    assert fingerprint.sha256 == models["1b"]
    with pytest.raises(HeadError, match=r"guardrail train --model ollama:tinyllama:1b`"):
        find_head(fingerprint.sha256, blob.name)  # the message names the model as Ollama does, not the blob
    head = plant_head(models["1b"])
    assert find_head(fingerprint.sha256, blob.name) == head


def test_an_ollama_blob_is_called_by_its_ollama_name(ollama, tmp_path):
    from guardrail.artifacts.stores import ollama_label

    assert ollama_label(resolve_model("ollama:someone/tuned:q4")) == "ollama:someone/tuned:q4"
    assert ollama_label(resolve_model("ollama:tinyllama")) == "ollama:tinyllama:latest"
    assert ollama_label(tmp_path / "model.gguf") is None


def test_a_missing_ollama_model_is_one_line_naming_the_manifest_and_the_store(ollama):
    root, _ = ollama
    with pytest.raises(ModelError) as error:
        resolve_model("ollama:llama3.2:1b")
    message = str(error.value)
    assert "\n" not in message
    assert str(root / "manifests" / "registry.ollama.ai" / "library" / "llama3.2" / "1b") in message
    assert "$OLLAMA_MODELS" in message and "ollama:tinyllama:1b" in message  # where it looked, what it has


def test_a_manifest_whose_blob_is_gone_says_so_and_how_to_get_it_back(ollama):
    ollama_root, _ = ollama
    with pytest.raises(ModelError, match=r"sha256-f{64} is missing .*`ollama pull gone:latest`"):
        resolve_model("ollama:gone")


def test_the_default_ollama_store_is_under_home(isolated):
    root = isolated / ".ollama" / "models"
    write_gguf(isolated / "m.gguf", "home")
    digest = ollama_blob(root, (isolated / "m.gguf").read_bytes())
    ollama_manifest(root, ("registry.ollama.ai", "library", "m"), "latest", digest, ollama_blob(root, b"{}"))
    assert resolve_model("ollama:m") == root / "blobs" / f"sha256-{digest}"


def test_a_manifest_without_a_gguf_layer_is_refused(ollama):
    root, _ = ollama
    path = root / "manifests" / "registry.ollama.ai" / "library" / "safetensors" / "latest"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.tensor", "digest": "sha256:" + "a" * 64}]}))
    with pytest.raises(ModelError, match="no GGUF model layer"):
        resolve_model("ollama:safetensors")


# ---- the Hugging Face cache ------------------------------------------------------------------

def hf_file(repo: Path, commit: str, name: str, data: bytes) -> None:
    """A file as huggingface_hub caches it: the blob under its LFS sha256, a relative symlink in the snapshot."""
    digest = hashlib.sha256(data).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / digest).write_bytes(data)
    link = repo / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(repo / "blobs" / digest, link.parent))


OLD, NEW = "a" * 40, "b" * 40


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """org/tiny-GGUF with two cached revisions (refs/main names the old one: one GGUF and a projector;
    the new one holds two quants), org/split-GGUF holding a model in two parts."""
    root = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    staging = tmp_path / "staging"
    tiny = root / "models--org--tiny-GGUF"
    for commit, name, file_type in [(OLD, "tiny-Q4_K_M.gguf", Q4_K_M), (NEW, "tiny-Q4_K_M.gguf", Q4_K_M),
                                    (NEW, "tiny-Q8_0.gguf", Q8_0)]:
        write_gguf(staging / commit / name, f"{commit[0]} {name}", file_type=file_type)
        hf_file(tiny, commit, name, (staging / commit / name).read_bytes())
    write_gguf(staging / "mmproj.gguf", "projector", arch="clip", file_type=None)
    hf_file(tiny, OLD, "mmproj-tiny-f16.gguf", (staging / "mmproj.gguf").read_bytes())
    hf_file(tiny, OLD, "README.md", b"# tiny")
    (tiny / "refs").mkdir()
    (tiny / "refs" / "main").write_text(OLD)
    split = root / "models--org--split-GGUF"
    write_gguf(staging / "split.gguf", "split")
    hf_file(split, NEW, "Q4_K_M/split-Q4_K_M-00001-of-00002.gguf", (staging / "split.gguf").read_bytes())
    hf_file(split, NEW, "Q4_K_M/split-Q4_K_M-00002-of-00002.gguf", b"second part")
    (split / "refs").mkdir()
    (split / "refs" / "main").write_text(NEW)
    return root


@pytest.fixture(params=["layout", "huggingface_hub"])
def hub(request, monkeypatch):
    """Each Hugging Face test runs twice: reading the cache's layout ourselves, and through huggingface_hub's
    scan_cache_dir when that package is installed."""
    if request.param == "layout":
        monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` fails
    else:
        pytest.importorskip("huggingface_hub")
        monkeypatch.setattr(stores, "_read_repo_layout", lambda *a: pytest.fail("read the layout, not the hub"))
    return request.param


def test_an_hf_repo_resolves_to_the_gguf_of_the_revision_refs_main_names(hf_cache, hub):
    snapshot = hf_cache / "models--org--tiny-GGUF" / "snapshots"
    assert resolve_model("hf:org/tiny-GGUF") == snapshot / OLD / "tiny-Q4_K_M.gguf"  # the projector is no model
    assert resolve_model("hf:org/tiny-GGUF/tiny-Q4_K_M.gguf") == snapshot / OLD / "tiny-Q4_K_M.gguf"
    assert resolve_model(f"hf:org/tiny-GGUF@{NEW[:8]}/tiny-Q8_0.gguf") == snapshot / NEW / "tiny-Q8_0.gguf"
    assert resolve_model(f"hf:org/tiny-GGUF@{NEW}:q8_0") == snapshot / NEW / "tiny-Q8_0.gguf"


def test_several_ggufs_and_no_choice_is_an_error_listing_them(hf_cache, hub):
    with pytest.raises(ModelError) as error:
        resolve_model(f"hf:org/tiny-GGUF@{NEW}")
    message = str(error.value)
    assert "\n" not in message and "holds 2 GGUF models; name one" in message
    assert f"hf:org/tiny-GGUF@{NEW}/tiny-Q4_K_M.gguf" in message and f"hf:org/tiny-GGUF@{NEW}/tiny-Q8_0.gguf" in message


def test_a_split_gguf_resolves_to_its_first_part(hf_cache, hub):
    first = hf_cache / "models--org--split-GGUF" / "snapshots" / NEW / "Q4_K_M" / "split-Q4_K_M-00001-of-00002.gguf"
    assert resolve_model("hf:org/split-GGUF") == first
    assert resolve_model("hf:org/split-GGUF/Q4_K_M/split-Q4_K_M-00002-of-00002.gguf") == first
    assert resolve_model(str(first.with_name("split-Q4_K_M-00002-of-00002.gguf"))) == first  # a path too


def test_a_repo_missing_from_the_cache_names_the_cache_and_how_to_download(hf_cache, hub):
    with pytest.raises(ModelError) as error:
        resolve_model("hf:org/absent-GGUF")
    message = str(error.value)
    assert "\n" not in message and str(hf_cache / "models--org--absent-GGUF") in message
    assert "$HF_HOME" in message and "guardrail fetch --model hf:org/absent-GGUF" in message
    with pytest.raises(ModelError, match="has no GGUF nope.gguf; it has: hf:org/tiny-GGUF/tiny-Q4_K_M.gguf"):
        resolve_model("hf:org/tiny-GGUF/nope.gguf")


def test_the_hf_cache_root_follows_huggingface_hubs_variables(tmp_path, monkeypatch, isolated):
    from guardrail.artifacts.stores import hf_cache_root

    assert hf_cache_root() == isolated / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home-hf"))
    assert hf_cache_root() == tmp_path / "home-hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert hf_cache_root() == tmp_path / "hub-cache"


def test_an_hf_model_is_hashed_once_then_found_by_path_size_and_mtime(hf_cache, monkeypatch):
    path = resolve_model("hf:org/tiny-GGUF")
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert fingerprint_file(path, "llama", 8, 2).sha256 == expected
    monkeypatch.setattr(hashes, "sha256_file", lambda p: pytest.fail(f"hashed {p} again"))
    assert fingerprint_file(path, "llama", 8, 2).sha256 == expected  # the snapshot link: its blob's entry
    plant_head(expected)
    assert find_head(expected, path.name) == user_head_path(expected)


def test_downloading_needs_huggingface_hub_and_is_said_in_one_line(hf_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert fetch_any("hf:org/tiny-GGUF") == resolve_model("hf:org/tiny-GGUF")  # cached: nothing to download
    with pytest.raises(ModelError, match="needs the huggingface_hub package and network access"):
        fetch_any("hf:org/absent-GGUF/absent-Q4_K_M.gguf")


def test_fetch_downloads_every_part_into_the_hf_cache_only_when_asked(hf_cache, monkeypatch, tmp_path):
    """guardrail fetch with huggingface_hub: the repository's file list, the one GGUF of the quant, both parts."""
    calls = []
    staging = tmp_path / "download.gguf"
    write_gguf(staging, "downloaded")

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None):
        calls.append(filename)
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        hf_file(repo, NEW, filename, staging.read_bytes() if "00001" in filename else b"part")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(NEW)

    files = ["README.md", "big-Q8_0.gguf", "big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf"]
    fake = types.SimpleNamespace(list_repo_files=lambda repo_id, revision=None: files, hf_hub_download=hf_hub_download)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    path = fetch_any("hf:org/big-GGUF:Q4_K_M")
    assert calls == ["big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf"]
    assert path == hf_cache / "models--org--big-GGUF" / "snapshots" / NEW / "big-Q4_K_M-00001-of-00002.gguf"
    with pytest.raises(ModelError, match="name one: hf:org/other-GGUF/big-Q4_K_M-00001-of-00002.gguf"):
        fetch_any("hf:org/other-GGUF")  # several quants and none named: nothing downloaded
    assert len(calls) == 2


# ---- LM Studio -------------------------------------------------------------------------------

def test_an_lmstudio_model_resolves_from_its_models_folder(isolated, monkeypatch):
    newer = isolated / ".lmstudio" / "models" / "lmstudio-community" / "Tiny-GGUF"
    older = isolated / ".cache" / "lm-studio" / "models" / "TheBloke" / "Old-GGUF"
    write_gguf(newer / "Tiny-Q4_K_M.gguf", "lmstudio tiny")
    write_gguf(newer / "Tiny-Q8_0.gguf", "lmstudio tiny q8", file_type=Q8_0)
    write_gguf(older / "old.Q4_K_M.gguf", "lmstudio old")
    assert resolve_model("lmstudio:lmstudio-community/Tiny-GGUF/Tiny-Q8_0.gguf") == newer / "Tiny-Q8_0.gguf"
    assert resolve_model("lmstudio:lmstudio-community/Tiny-GGUF:Q4_K_M") == newer / "Tiny-Q4_K_M.gguf"
    assert resolve_model("lmstudio:TheBloke/Old-GGUF") == older / "old.Q4_K_M.gguf"
    monkeypatch.setenv("LMSTUDIO_MODELS", str(isolated / "elsewhere"))
    write_gguf(isolated / "elsewhere" / "me" / "Mine" / "mine.gguf", "mine")
    assert resolve_model("lmstudio:me/Mine") == isolated / "elsewhere" / "me" / "Mine" / "mine.gguf"


def test_a_missing_lmstudio_model_names_both_folders(isolated):
    with pytest.raises(ModelError) as error:
        resolve_model("lmstudio:someone/Nothing-GGUF")
    message = str(error.value)
    assert "\n" not in message
    assert str(isolated / ".lmstudio" / "models" / "someone" / "Nothing-GGUF") in message
    assert str(isolated / ".cache" / "lm-studio" / "models" / "someone" / "Nothing-GGUF") in message


# ---- one error, one line -----------------------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("ollama:", "is not a model name a store knows"),
    ("ollama:a/b/c/d", "is not an Ollama model name"),
    ("hf:just-a-name", "names no repository"),
    ("nowhere.gguf", "model file not found"),
])
def test_a_name_no_store_can_read_is_one_line_saying_what_is_accepted(name, message):
    with pytest.raises(ModelError) as error:
        resolve_model(name)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_cli_turns_a_missing_store_model_into_one_line_and_exit_1(tmp_path, isolated):
    env = os.environ | {"OLLAMA_MODELS": str(tmp_path / "empty"), "HOME": str(isolated)}
    result = subprocess.run([sys.executable, "-m", "cli", "info", "--model", "ollama:llama3.2:1b"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: no Ollama model ollama:llama3.2:1b") and str(tmp_path / "empty") in lines[0]


def test_the_llm_plugin_registers_a_store_name_as_a_name(ollama, tmp_path):
    pytest.importorskip("llm")
    import click

    from guardrail.surfaces.llm_plugin import _default_name, registrable

    assert registrable("ollama:tinyllama:1b") == "ollama:tinyllama:1b"  # it follows what the store holds
    assert _default_name("ollama:tinyllama:1b", "ollama:tinyllama:1b") == "tinyllama-1b"
    write_gguf(tmp_path / "mine.gguf", "mine")
    assert registrable(str(tmp_path / "mine.gguf")) == str((tmp_path / "mine.gguf").resolve())
    with pytest.raises(click.ClickException, match="no Ollama model ollama:absent:latest"):
        registrable("ollama:absent")


# ---- the GGUF header, read without parsing the vocabulary ----------------------------------------

def test_the_header_reader_agrees_with_ggufs_own_reader(tmp_path):
    from guardrail.artifacts.gguf_header import Array, read_header

    path = tmp_path / "every-kind.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(["<s>", "héllo", "", "x" * 300])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_bool("test.flag", True)
    writer.add_float32("test.half", 0.5)
    writer.add_uint64("test.big", 2**40)
    writer.add_file_type(Q8_0)
    writer.add_tensor("a.weight", np.zeros((3, 64), dtype=np.float16))
    writer.add_tensor("b.bias", np.ones(5, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header, reader = read_header(path), gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the reader's own pseudo-keys (version, counts)
        mine = header.fields[key]
        if field.types[0] == gguf.GGUFValueType.ARRAY:  # gguf counts a nested array's leaves; we its items
            assert mine == Array(field.types[1], len(field.data) if len(field.types) == 2 else 2), key
        else:
            assert mine == field.contents(), key
    assert [(t.name, t.type, t.shape) for t in header.tensors] == [
        (t.name, int(t.tensor_type), tuple(int(d) for d in t.shape)) for t in reader.tensors]


def test_a_truncated_or_foreign_file_is_a_header_error(tmp_path):
    from guardrail.artifacts.gguf_header import GGUFHeaderError, read_header

    whole = tmp_path / "whole.gguf"
    write_gguf(whole, "whole")
    data = whole.read_bytes()
    for size, why in [(len(data) - 1, "runs past the end"), (40, "truncated"), (10, "too short")]:
        (tmp_path / "cut.gguf").write_bytes(data[:size])
        with pytest.raises(GGUFHeaderError, match=why):
            read_header(tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_bytes(b"this is not a model file at all")
    with pytest.raises(GGUFHeaderError, match="no GGUF magic"):
        read_header(tmp_path / "text.gguf")


# ---- guardrail models --------------------------------------------------------------------------

@pytest.fixture
def machine(ollama, hf_cache, isolated):
    """All four stores at once: guardrail's cache (a known model's file name), Ollama, HF, LM Studio."""
    cache = Path(os.environ["GUARDRAIL_CACHE"]) / "models"
    write_gguf(cache / KNOWN_MODELS["gemma3-270m"].filename, "not really gemma", arch="gemma3")
    write_gguf(cache / "vocab-only.gguf", "a vocabulary", tensors=False)
    write_gguf(isolated / ".lmstudio" / "models" / "pub" / "Lm-GGUF" / "lm-Q8_0.gguf", "lm", file_type=Q8_0)
    write_gguf(isolated / ".lmstudio" / "models" / "pub" / "Lm-GGUF" / "adapter.gguf", "lora", kind="adapter")
    (isolated / ".lmstudio" / "models" / "pub" / "Broken-GGUF").mkdir(parents=True)
    (isolated / ".lmstudio" / "models" / "pub" / "Broken-GGUF" / "broken.gguf").write_bytes(b"GGUF\x03")
    plant_head(ollama[1]["1b"])
    return ollama, hf_cache


def test_guardrail_models_lists_every_chat_model_with_its_metadata_and_head(machine, no_hashing):
    rows = {row["model"]: row for row in list_models()}
    assert list(rows) == [  # no projector, adapter or vocabulary-only file; each store in its own order
        "gemma3-270m", "ollama:hf.co/org/repo-GGUF:Q4_K_M", "ollama:tinyllama:1b", "ollama:tinyllama:latest",
        "ollama:someone/tuned:q4", "hf:org/split-GGUF/Q4_K_M/split-Q4_K_M-00001-of-00002.gguf",
        "hf:org/tiny-GGUF/tiny-Q4_K_M.gguf", f"hf:org/tiny-GGUF@{NEW[:12]}/tiny-Q4_K_M.gguf",
        f"hf:org/tiny-GGUF@{NEW[:12]}/tiny-Q8_0.gguf", "lmstudio:pub/Broken-GGUF/broken.gguf",
        "lmstudio:pub/Lm-GGUF/lm-Q8_0.gguf",
    ]
    tiny = rows["ollama:tinyllama:1b"]
    assert (tiny["store"], tiny["architecture"], tiny["quantization"], tiny["n_layer"]) == ("ollama", "llama", "Q4_K_M", 2)
    assert (tiny["head"], tiny["head_path"]) == ("trained", str(user_head_path(machine[0][1]["1b"])))
    assert rows["ollama:tinyllama:latest"]["head"] == "none"  # its blob name is its sha256: known, no head
    assert rows[f"hf:org/tiny-GGUF@{NEW[:12]}/tiny-Q8_0.gguf"]["quantization"] == "Q8_0"
    assert rows["gemma3-270m"]["architecture"] == "gemma3"
    split = rows["hf:org/split-GGUF/Q4_K_M/split-Q4_K_M-00001-of-00002.gguf"]
    assert split["size_bytes"] == Path(split["path"]).stat().st_size + len(b"second part")  # both parts
    assert rows["hf:org/tiny-GGUF/tiny-Q4_K_M.gguf"]["head"] == "unknown"  # not hashed: the listing never hashes
    assert rows["lmstudio:pub/Broken-GGUF/broken.gguf"]["error"].startswith("not a readable GGUF file")
    assert tiny["train"] == "guardrail train --model ollama:tinyllama:1b"
    for spec, row in rows.items():
        if "error" not in row and row["store"] != "guardrail":
            assert resolve_model(spec) == Path(row["path"])  # every listed name is one --model takes


def test_guardrail_models_hash_finds_the_heads_of_the_rest(machine):
    rows = {row["model"]: row for row in list_models(hash_missing=True)}
    assert all(row["head"] in ("none", "trained") for row in rows.values() if "error" not in row)
    assert rows["hf:org/tiny-GGUF/tiny-Q4_K_M.gguf"]["sha256"] == hashlib.sha256(
        Path(rows["hf:org/tiny-GGUF/tiny-Q4_K_M.gguf"]["path"]).read_bytes()).hexdigest()


def test_the_models_command_prints_a_table_or_json(machine, monkeypatch):
    from click.testing import CliRunner

    import cli
    from guardrail.surfaces import ui

    listing = CliRunner().invoke(cli.cli, ["models", "--json"], catch_exceptions=False)
    assert listing.exit_code == 0
    assert {row["model"] for row in json.loads(listing.output)} >= {"ollama:tinyllama:1b", "gemma3-270m"}
    monkeypatch.setattr(ui.console, "_width", 200)
    table = CliRunner().invoke(cli.cli, ["models"], catch_exceptions=False)
    assert table.exit_code == 0 and "ollama:tinyllama:1b" in table.output and "trained" in table.output
    assert "no head for ollama:tinyllama:latest: guardrail train --model ollama:tinyllama:latest" in table.output
    assert "guardrail models --hash" in table.output


def test_no_models_anywhere_is_said_plainly(isolated):
    from click.testing import CliRunner

    import cli

    assert list_models() == []
    result = CliRunner().invoke(cli.cli, ["models"], catch_exceptions=False)
    assert result.exit_code == 0 and "no GGUF chat models found" in result.output
