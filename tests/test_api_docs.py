"""Every public name has a docstring with a runnable `>>>` example (the doctests run them)."""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator

import pytest

import torch_modelstate as tms
from torch_modelstate import ModelState


def _is_documentable(obj: object) -> bool:
    """Functions, classes, properties and modules carry a docstring; a type alias cannot."""
    return (
        inspect.isroutine(obj)
        or inspect.isclass(obj)
        or isinstance(obj, (property, types.ModuleType))
    )


def _public_of_module(module: types.ModuleType) -> Iterator[tuple[str, object]]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if inspect.isroutine(obj) and getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exported from elsewhere: checked where it is defined
        yield f"{module.__name__}.{name}", obj


def _public_names() -> list[tuple[str, object]]:
    found: dict[str, object] = {}
    for name in tms.__all__:
        obj = getattr(tms, name)
        found[f"torch_modelstate.{name}"] = obj
        if isinstance(obj, types.ModuleType):
            found.update(_public_of_module(obj))
    for klass in reversed(ModelState.__mro__[:-1]):  # its mixins' methods too, minus object's
        for name, attr in vars(klass).items():
            if not name.startswith("_"):
                found[f"ModelState.{name}"] = attr
    return [(k, v) for k, v in found.items() if _is_documentable(v)]


PUBLIC = _public_names()


def _doc(obj: object) -> str:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return inspect.getdoc(obj) or ""


def test_the_public_surface_is_found() -> None:
    """The walk sees the surface it is meant to check (a guard against checking nothing)."""
    names = {name for name, _ in PUBLIC}
    for expected in (
        "torch_modelstate.ModelState",
        "torch_modelstate.save",
        "torch_modelstate.load",
        "ModelState.freeze",
        "ModelState.merge",
        "ModelState.parameters",
        "ModelState.tie",
        "torch_modelstate.merges.lerp",
    ):
        assert expected in names


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=[name for name, _ in PUBLIC])
def test_public_name_has_a_docstring_with_an_example(name: str, obj: object) -> None:
    """The docstring says what the name is for and shows it in a runnable `>>>` example."""
    doc = _doc(obj)
    assert doc.strip(), f"{name} has no docstring"
    assert ">>>" in doc, f"{name}'s docstring has no `>>>` example"
