"""The packages' public API is declared and documented: every module has ``__all__``, every name in it exists,
and every public function, class and method has a docstring.

Read with :mod:`ast` only (nothing is imported), so the check is fast and needs none of the packages'
dependencies.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fl_client", "fl_server", "imaging", "models")


@pytest.fixture(scope="module")
def modules() -> dict[str, ast.Module]:
    """Every ``.py`` file of the packages, parsed, keyed by its path relative to the repository root."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[path.relative_to(ROOT).as_posix()] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert len(found) > len(PACKAGES), f"no modules found under {ROOT}"
    return found


def _body(tree: ast.Module) -> list[ast.stmt]:
    """The module's statements without its docstring."""
    body = list(tree.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return body


def _is_all(node: ast.stmt) -> bool:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)


def _type_checking(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level(statements: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that run at import, descending into ``if`` (not ``if TYPE_CHECKING``), ``try`` and ``with``."""
    for node in statements:
        yield node
        if isinstance(node, ast.If) and not _type_checking(node):
            yield from _top_level(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body + [s for h in node.handlers for s in h.body] + node.orelse
                                  + node.finalbody)
        elif isinstance(node, ast.With):
            yield from _top_level(node.body)


def _bound_names(tree: ast.Module) -> set[str]:
    """The names a module binds at import (``if TYPE_CHECKING`` imports do not count: they do not exist then)."""
    names: set[str] = set()
    for node in _top_level(tree.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.For):
            if isinstance(node, ast.AnnAssign) and node.value is None:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _reexports_only(path: str, tree: ast.Module) -> bool:
    """An ``__init__.py`` that holds nothing but imports (and perhaps ``__all__``)."""
    return path.endswith("__init__.py") and all(
        isinstance(n, ast.Import | ast.ImportFrom) or _is_all(n) for n in _body(tree))


def _declared(tree: ast.Module) -> ast.expr | None:
    """The value assigned to ``__all__``, or None if the module has none."""
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and _is_all(node):
            return node.value
    return None


def _undocumented(statements: list[ast.stmt], prefix: str = "") -> Iterator[str]:
    """Public functions, classes and methods (of public classes) without a docstring, as ``name:line``."""
    for node in statements:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) or node.name.startswith("_"):
            continue
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _accessor_or_overload(node):
            continue
        if not ast.get_docstring(node):
            yield f"{prefix}{node.name}:{node.lineno}"
        if isinstance(node, ast.ClassDef):
            yield from _undocumented(node.body, f"{prefix}{node.name}.")


def _accessor_or_overload(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A property's setter or deleter (documented on its getter), or a ``typing.overload`` signature."""
    for decorator in node.decorator_list:
        if isinstance(decorator, ast.Attribute) and decorator.attr in ("setter", "deleter"):
            return True
        if (isinstance(decorator, ast.Name) and decorator.id == "overload") or (
                isinstance(decorator, ast.Attribute) and decorator.attr == "overload"):
            return True
    return False


def test_every_module_declares_all(modules: dict[str, ast.Module]) -> None:
    missing = [path for path, tree in modules.items()
               if _body(tree) and not _reexports_only(path, tree) and _declared(tree) is None]
    assert not missing, "modules without __all__ (list the names other modules or users import from them):\n  " \
        + "\n  ".join(missing)


def test_every_name_in_all_exists_and_is_public(modules: dict[str, ast.Module]) -> None:
    problems = []
    for path, tree in modules.items():
        declared = _declared(tree)
        if declared is None:
            continue
        if not isinstance(declared, ast.List | ast.Tuple) or not all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in declared.elts):
            problems.append(f"{path}:{declared.lineno}: __all__ is not a literal list of strings")
            continue
        listed = [str(e.value) for e in declared.elts if isinstance(e, ast.Constant)]
        bound = _bound_names(tree)
        problems += [f"{path}: {name!r} is in __all__ but not defined or imported there (an import under "
                     "TYPE_CHECKING does not count)" for name in listed if name not in bound]
        problems += [f"{path}: {name!r} is in __all__ but private" for name in listed if name.startswith("_")]
        problems += [f"{path}: {name!r} is in __all__ twice" for name in sorted(set(listed)) if listed.count(name) > 1]
    assert not problems, "bad __all__ entries:\n  " + "\n  ".join(problems)


def test_every_public_function_class_and_method_has_a_docstring(modules: dict[str, ast.Module]) -> None:
    missing = [f"{path}:{where}" for path, tree in modules.items()
               for where in _undocumented(list(_top_level(tree.body)))]
    assert not missing, "public functions, classes and methods without a docstring (path:name:line):\n  " \
        + "\n  ".join(missing)
