"""What a Python user meets: the distribution's name, pip without the Makefile, and a clear
line (never a traceback or a crash) when llama-cpp-python is missing or not the API guardrail binds."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import guardrail
from guardrail.errors import GuardrailError, LlamaCppError
from guardrail.runtime.engine import Model

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _llama_requirement() -> Requirement:
    (requirement,) = [Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == "llama-cpp-python"]
    return requirement


def _source_copy(dest: Path) -> Path:
    """The project's sources without build outputs, so a build starts from what a user clones."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "*.so", ".pytest_cache",
                                    ".ruff_cache", "out")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def test_the_distribution_has_a_free_name_and_imports_as_guardrail():
    # "guardrail" on PyPI is an unrelated project (object-level permissions for ORMs).
    assert PROJECT["name"] == "guardrail-llm"
    assert PROJECT["scripts"]["guardrail"] == "cli:main"
    assert guardrail.__version__ == PROJECT["version"]
    assert "pip install" in (ROOT / "README.md").read_text() and "guardrail-llm" in (ROOT / "README.md").read_text()


def test_llama_cpp_python_is_a_range_that_holds_the_installed_release():
    requirement = _llama_requirement()
    operators = {spec.operator for spec in requirement.specifier}
    assert operators == {">=", "<"}  # a tested range, not one exact release
    assert str(requirement.specifier) == str(Requirement("x" + guardrail.LLAMA_CPP_SUPPORTED).specifier)
    assert requirement.specifier.contains(importlib.metadata.version("llama-cpp-python"))


def _import_guardrail_with(tmp_path: Path, init: str, low: str = "", cli: bool = False) -> subprocess.CompletedProcess:
    """Run ``import guardrail`` (or the CLI) against a stand-in llama_cpp package."""
    package = tmp_path / "stub" / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init)
    (package / "llama_cpp.py").write_text(low)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "stub"), str(ROOT)])}
    env.pop("GUARDRAIL_DEBUG", None)
    code = "import cli; cli.main()" if cli else "import guardrail"
    return subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, env=env,
                          timeout=120)


OLD_BINDINGS = '''
import ctypes
class llama_context_params(ctypes.Structure):
    _fields_ = [("n_ctx", ctypes.c_uint32), ("n_seq_max", ctypes.c_uint32), ("embeddings", ctypes.c_bool),
                ("pooling_type", ctypes.c_int), ("cb_eval", ctypes.c_void_p), ("cb_eval_user_data", ctypes.c_void_p)]
class llama_model_params(ctypes.Structure):
    _fields_ = [("n_gpu_layers", ctypes.c_int32), ("vocab_only", ctypes.c_bool)]
class llama_batch(ctypes.Structure):
    _fields_ = [("token", ctypes.c_void_p), ("pos", ctypes.c_void_p), ("n_seq_id", ctypes.c_void_p),
                ("seq_id", ctypes.c_void_p), ("logits", ctypes.c_void_p)]
def _f(n):
    def f(*args): raise AssertionError("guardrail must not call an unchecked binding")
    f.argtypes = [ctypes.c_int] * n
    return f
llama_tokenize = _f(7)
llama_token_to_piece = _f(5)
llama_decode = _f(2)
'''


def test_an_old_llama_cpp_python_is_one_clear_line_at_import(tmp_path):
    result = _import_guardrail_with(tmp_path, '__version__ = "0.2.90"\nfrom . import llama_cpp\n', OLD_BINDINGS)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("guardrail.errors.LlamaCppError: llama-cpp-python 0.2.90 lacks the low-level API")
    assert "llama_token_to_piece takes 5 arguments" in last and "pip install 'llama-cpp-python>=" in last
    assert "AssertionError" not in result.stderr  # checked, never called


def test_the_cli_says_an_api_mismatch_in_one_line_and_exits_1(tmp_path):
    result = _import_guardrail_with(tmp_path, '__version__ = "0.2.90"\nfrom . import llama_cpp\n', OLD_BINDINGS,
                                    cli=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: llama-cpp-python 0.2.90 lacks"), result.stderr
    assert "no llama_memory_seq_cp" in lines[0]


def test_a_llama_cpp_python_whose_library_does_not_load_is_one_line(tmp_path):
    broken = "raise RuntimeError(\"Failed to load shared library 'libllama.so': undefined symbol: ggml_x\")\n"
    result = _import_guardrail_with(tmp_path, broken, cli=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "native library does not load (Failed to load shared library" in lines[0]


def test_a_missing_llama_cpp_python_is_one_clear_line():
    code = "import sys; sys.modules['llama_cpp'] = None\nimport cli; cli.main()"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "which is not installed" in lines[0] and "pip install" in lines[0]


def test_the_mismatch_error_is_both_guardrails_and_an_import_error():
    assert issubclass(LlamaCppError, GuardrailError) and issubclass(LlamaCppError, ImportError)


def test_a_models_display_name_is_its_known_name_or_its_file_name(model, tmp_path):
    assert model.meta("general.name") == "Smollm2 135M 8k Lc100K Mix1 Ep2"  # a training-run label
    assert model.info.name == "smollm2-135m-instruct"
    renamed = tmp_path / "my-assistant.Q4_1.gguf"
    renamed.symlink_to(model.path)
    with Model(renamed, vocab_only=True) as mine:
        assert mine.info.name == "my-assistant.Q4_1"


@pytest.mark.model  # compiles the native capture
def test_pip_wheel_builds_without_the_makefile(tmp_path):
    source = _source_copy(tmp_path / "src")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(source)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("guardrail_llm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.startswith("guardrail/runtime/_capture") and n.endswith(".so") for n in names)  # compiled
    assert {"cli.py", "guardrail/artifacts/heads/smollm2-135m-instruct.gguf",
            "guardrail/artifacts/heads/gemma3-270m.gguf"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "Name: guardrail-llm" in metadata
    assert f"Requires-Dist: llama-cpp-python{_llama_requirement().specifier}" in metadata


def _built_llama_wheels() -> list[Path]:
    from guardrail.artifacts.wheels import cache_dir

    return sorted((cache_dir() / "llama-wheels").glob("*/llama_cpp_python-*.whl"))


@pytest.mark.network
def test_pip_install_into_a_fresh_venv_gives_a_working_guardrail_command(tmp_path, model_path):
    """``pip install .`` with no Makefile: llama-cpp-python comes from the wheel `make setup` built
    (it has no binary wheels on PyPI; building it again would take minutes), the rest from PyPI."""
    wheels = _built_llama_wheels()
    if not wheels:
        pytest.skip("no built llama-cpp-python wheel in the cache (run `make setup` once)")
    source = _source_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # only the venv
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                             "--only-binary", "llama-cpp-python", "--find-links", str(wheels[0].parent), str(source)],
                            capture_output=True, text=True, timeout=900, env=clean)
    if result.returncode != 0 and ("Could not find a version" in result.stderr or "connection" in result.stderr):
        pytest.skip(f"PyPI unreachable: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-2000:]
    info = subprocess.run([str(venv / "bin" / "guardrail"), "info", "--model", str(model_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=clean)
    assert info.returncode == 0, info.stderr
    assert "smollm2-135m-instruct" in info.stdout and "architecture" in info.stdout
    imported = subprocess.run([str(python), "-c", "import guardrail; from guardrail import Guard; "
                               "print(guardrail.__file__)"], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env=clean)
    assert imported.returncode == 0 and str(venv) in imported.stdout, imported.stderr
