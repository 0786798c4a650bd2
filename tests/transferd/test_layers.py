"""The package layout is the architecture: protocol/ is sans-I/O (no event loop, no HTTP
library), site/ is blocking local I/O (no event loop either), net/ holds the asyncio adapters;
dependencies point protocol <- site <- net <- daemon, never back. These tests walk the imports
of every module (including imports inside functions) and follow transferd's own modules."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "transferd"


def _module_path(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "transferd":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _direct_imports(name: str) -> frozenset[str]:
    path = _module_path(name)
    assert path is not None, name
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            # `from transferd.protocol import auth` imports the submodule auth
            found.update(
                f"{module}.{alias.name}"
                for alias in node.names
                if _module_path(f"{module}.{alias.name}") is not None
            )
    return frozenset(found)


def _closure(name: str) -> dict[str, str]:
    """Every module `name` imports, directly or through transferd's own modules, mapped to the
    transferd module that imports it."""
    seen: dict[str, str] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        for imported in _direct_imports(current):
            if imported in seen:
                continue
            seen[imported] = current
            if _module_path(imported) is not None:
                todo.append(imported)
    return seen


def _modules(subpackage: str) -> list[str]:
    folder = PACKAGE / subpackage
    return [
        f"transferd.{subpackage}" if p.name == "__init__.py" else f"transferd.{subpackage}.{p.stem}"
        for p in sorted(folder.glob("*.py"))
    ]


def _offending(name: str, refused: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} (imported by {by})"
        for module, by in _closure(name).items()
        if any(module == r or module.startswith(r + ".") for r in refused)
    )


@pytest.mark.parametrize("module", _modules("protocol"))
def test_protocol_modules_import_no_event_loop_http_library_or_io_layer(module: str) -> None:
    refused = ("asyncio", "aiohttp", "transferd.site", "transferd.net", "transferd.daemon")
    assert _offending(module, refused) == []


@pytest.mark.parametrize("module", _modules("site"))
def test_site_modules_import_no_event_loop_or_adapter(module: str) -> None:
    refused = ("asyncio", "aiohttp", "transferd.net", "transferd.daemon")
    assert _offending(module, refused) == []


@pytest.mark.parametrize("module", _modules("net"))
def test_adapters_do_not_import_the_daemon_that_wires_them(module: str) -> None:
    assert _offending(module, ("transferd.daemon", "transferd.cli")) == []


def test_the_walk_sees_imports_inside_functions_and_through_other_modules() -> None:
    """The checks above can fail: the daemon reaches asyncio, and the server reaches the
    protocol's auth through its own imports."""
    assert _offending("transferd.daemon", ("asyncio",)) != []
    assert "transferd.protocol.auth" in _closure("transferd.net.server")


def test_transferd_tests_use_public_names_only() -> None:
    """Tests hold the package to its public surface: no `_private` module or name."""
    tests = Path(__file__).resolve().parents[1]
    private = []
    for path in sorted([*tests.glob("transferd/*.py"), *tests.glob("integration/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transferd"):
                names = [node.module or "", *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("transferd")]
            else:
                continue
            if any(part.startswith("_") for name in names for part in name.split(".")):
                private.append(f"{path.name}:{node.lineno}")
    assert private == []
