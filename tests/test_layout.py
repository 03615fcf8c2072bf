"""The package's layout is its architecture: data flows one way, and nothing imports upward.

Groups, lowest first. A module may import its own group and any group below
it, never one above. ``training`` sits beside the loop (it reads the runtime,
the runtime never reads it); ``measure`` runs both sides of a comparison, so it
may use the server and the training data; the surfaces (Rich UI, demo) and the
CLI only consume. Imports inside functions count as much as top-level ones.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("_version", "_json", "_ciphers", "errors", "artifacts", "head", "runtime", "training", "serve", "measure", "surfaces", "cli")


def _group(module: str) -> str | None:
    """The layout group of a guardrail module name (None for the package root)."""
    if module == "cli":
        return "cli"
    parts = module.split(".")
    if parts[0] != "guardrail" or len(parts) == 1:
        return None
    return parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@functools.lru_cache(maxsize=None)
def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of a guardrail module in a file, nested ones included."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            if not node.module:  # from . import x: x may be a module
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name == "cli" or name.startswith("guardrail")]


def _sources() -> list[Path]:
    return sorted((ROOT / "guardrail").rglob("*.py")) + [ROOT / "cli.py"]


def violations() -> list[str]:
    out = []
    for path in _sources():
        mine = _group(_module_name(path))
        if mine is None:
            continue
        for line, target in _imports(path):
            theirs = _group(target)
            if theirs is None or theirs not in ORDER:
                continue
            if ORDER.index(theirs) > ORDER.index(mine):
                out.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {target} ({theirs})")
    return out


def test_every_package_is_a_known_layout_group():
    groups = {p.name for p in (ROOT / "guardrail").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    groups |= {p.stem for p in (ROOT / "guardrail").glob("*.py") if p.stem != "__init__"}
    assert groups <= set(ORDER), f"place these in the layout order: {sorted(groups - set(ORDER))}"


def test_nothing_imports_upward():
    assert violations() == []


@pytest.mark.parametrize("forbidden", ["guardrail.training", "guardrail.serve", "guardrail.measure",
                                       "guardrail.surfaces", "cli"])
def test_the_runtime_never_imports_training_serving_measurement_or_surfaces(forbidden):
    for path in sorted((ROOT / "guardrail" / "runtime").rglob("*.py")):
        for line, target in _imports(path):
            assert not (target == forbidden or target.startswith(forbidden + ".")), \
                f"{path.relative_to(ROOT)}:{line} imports {target}"


def test_the_head_imports_no_trainer():
    for path in sorted((ROOT / "guardrail" / "head").rglob("*.py")):
        for line, target in _imports(path):
            assert _group(target) in (None, "_version", "_json", "errors", "artifacts", "head"), \
                f"{path.relative_to(ROOT)}:{line} imports {target}"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The contract test must be able to fail: an upward import in a runtime module is reported."""
    fake_root = tmp_path
    (fake_root / "guardrail" / "runtime").mkdir(parents=True)
    (fake_root / "guardrail" / "__init__.py").write_text("")
    (fake_root / "guardrail" / "runtime" / "__init__.py").write_text("")
    (fake_root / "guardrail" / "runtime" / "loop.py").write_text(
        "def f():\n    from guardrail.training.pipeline import train_default\n")
    (fake_root / "cli.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake_root)
    assert violations() == ["guardrail/runtime/loop.py:2 (runtime) imports guardrail.training.pipeline (training)"]


def test_the_head_and_the_data_import_without_llama_cpp():
    """The numpy-only parts need no llama.cpp library; the runtime says in one line that it does."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['llama_cpp'] = None\n"
            "import guardrail.head, guardrail.head.file, guardrail.training.data, guardrail.training.data.build\n"
            "from guardrail.errors import LlamaCppError\n"
            "try:\n    import guardrail.runtime\nexcept LlamaCppError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "which is not installed" in result.stdout and "pip install" in result.stdout
