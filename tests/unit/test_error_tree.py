"""The exception tree drawn in ``microvm_blueprint/errors.py`` is the whole tree: every class of the
package under ``MicrovmBlueprintError`` appears in it, under its real parent and module, and every
name drawn is a real class. A class added (or moved) without being drawn fails here."""

from __future__ import annotations

import importlib
import pkgutil
import re

import microvm_blueprint
from microvm_blueprint import errors

PACKAGE = "microvm_blueprint."
_LINE = re.compile(r"^(?P<lead>[ │├└─]*?)(?P<name>[A-Z]\w*)\s+(?P<module>[a-z][\w.]*)\b")


def all_error_classes() -> set[type[BaseException]]:
    for info in pkgutil.walk_packages(microvm_blueprint.__path__, PACKAGE):
        importlib.import_module(info.name)
    found: set[type[BaseException]] = set()
    todo: list[type[BaseException]] = [errors.MicrovmBlueprintError]
    while todo:
        cls = todo.pop()
        if cls in found or not cls.__module__.startswith("microvm_blueprint"):
            continue  # subclasses made by tests are not the package's
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def drawn_tree() -> dict[str, tuple[str | None, str]]:
    """name -> (parent name, module relative to the package) for each class drawn in the docstring."""
    doc = errors.__doc__ or ""
    block = doc.split("::", 1)[1]
    tree: dict[str, tuple[str | None, str]] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, name) of the current ancestors
    for line in block.splitlines():
        if not line.strip():
            if tree:
                break  # the blank line after the drawing ends it
            continue
        m = _LINE.match(line)
        assert m, f"a line of the drawing does not read 'Name  module  text': {line!r}"
        col = m.start("name")
        while stack and stack[-1][0] >= col:
            stack.pop()
        name = m.group("name")
        assert name not in tree, f"{name} is drawn twice"
        tree[name] = (stack[-1][1] if stack else None, m.group("module"))
        stack.append((col, name))
    return tree


def test_every_error_class_is_drawn_under_its_parent() -> None:
    tree = drawn_tree()
    classes = all_error_classes()
    assert len(classes) > 20  # the walk found the package's modules (not just the root)
    missing = sorted(c.__name__ for c in classes if c.__name__ not in tree)
    assert missing == [], f"not drawn in microvm_blueprint/errors.py's docstring: {missing}"
    for cls in classes:
        parent, module = tree[cls.__name__]
        assert module == cls.__module__.removeprefix(PACKAGE), f"{cls.__name__} is drawn in the wrong module"
        if cls is errors.MicrovmBlueprintError:
            assert parent is None
        else:
            bases = [b.__name__ for b in cls.__bases__]
            assert parent in bases, f"{cls.__name__} is drawn under {parent}, its bases are {bases}"


def test_every_drawn_name_is_a_class() -> None:
    names = {c.__name__ for c in all_error_classes()}
    stale = sorted(set(drawn_tree()) - names)
    assert stale == [], f"drawn in errors.py but no such class under MicrovmBlueprintError: {stale}"


def test_class_names_are_unique() -> None:
    """The drawing names classes by their bare name: two classes of one name would be ambiguous."""
    seen: dict[str, str] = {}
    for cls in all_error_classes():
        other = seen.setdefault(cls.__name__, cls.__module__)
        assert other == cls.__module__, f"{cls.__name__} is defined in both {other} and {cls.__module__}"
