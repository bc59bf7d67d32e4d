"""Public surfaces and the layering rule: edgebus never loads torch, qkv never loads zmq or asyncio."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("package", ["qkv", "edgebus", "nodes"])
def test_every_exported_name_exists_and_is_public(package: str) -> None:
    module = importlib.import_module(package)
    exported = module.__all__
    assert len(exported) == len(set(exported))
    for name in exported:
        assert not name.startswith("_")
        assert hasattr(module, name), f"{package}.{name} is in __all__ but missing"


def _modules_after_import(package: str) -> set[str]:
    code = f"import sys, {package}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_edgebus_does_not_load_torch_or_qkv() -> None:
    loaded = _modules_after_import("edgebus")
    assert "torch" not in loaded
    assert "qkv" not in loaded


def _imported_roots(package: str) -> set[str]:
    roots: set[str] = set()
    for path in (Path(__file__).parent.parent / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
    return roots


def test_qkv_does_not_load_zmq_or_edgebus() -> None:
    loaded = _modules_after_import("qkv")
    assert "zmq" not in loaded
    assert "edgebus" not in loaded


def test_qkv_code_never_imports_asyncio_or_zmq() -> None:
    # transformers itself imports asyncio; the rule is about our code.
    assert not {"asyncio", "zmq", "edgebus", "nodes"} & _imported_roots("qkv")


def test_edgebus_code_never_imports_torch_or_qkv() -> None:
    assert not {"torch", "transformers", "qkv", "nodes"} & _imported_roots("edgebus")


def test_the_cli_starts_without_torch() -> None:
    assert "torch" not in _modules_after_import("nodes.cli")
