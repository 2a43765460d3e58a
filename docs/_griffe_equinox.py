"""Griffe extension: constructor signatures for Equinox modules.

`eqx.Module` subclasses are dataclasses made by a metaclass, which static
analysis does not see, so the API reference would show `Newton` without its
arguments. This extension gives every Equinox module that does not define
`__init__` the dataclass `__init__` its fields imply (fields of Equinox
ancestors first, `eqx.field(default=...)` defaults, `ClassVar`s and
`init=False` fields left out), as griffe's own extension does for
`@dataclass`.
"""

from typing import Any

import griffe

_MODULE = {"equinox.Module", "equinox._module.Module", "equinox._module._module.Module"}
_FIELD = {"equinox.field", "equinox._module.field", "equinox._module._field.field"}


def _is_module(cls: griffe.Class, seen: frozenset = frozenset()) -> bool:
    if cls.path in seen:
        return False
    for base in cls.bases:
        path = getattr(base, "canonical_path", str(base))
        # `Generic[...]`-style subscripts: look at the subscripted name.
        left = getattr(base, "left", None)
        if left is not None:
            path = getattr(left, "canonical_path", str(left))
        if path in _MODULE:
            return True
        try:
            parent = cls.modules_collection[path]
        except (KeyError, AttributeError):
            continue
        if isinstance(parent, griffe.Class) and _is_module(parent, seen | {cls.path}):
            return True
    return False


def _field_arguments(attribute: griffe.Attribute) -> dict[str, Any] | None:
    value = attribute.value
    if isinstance(value, griffe.ExprCall) and value.canonical_path in _FIELD:
        return {
            arg.name: arg.value
            for arg in value.arguments
            if isinstance(arg, griffe.ExprKeyword)
        }
    return None


def _fields(cls: griffe.Class) -> list[griffe.Parameter]:
    parameters = []
    for member in cls.members.values():
        if not isinstance(member, griffe.Attribute) or member.annotation is None:
            continue
        if "property" in member.labels or (
            "class-attribute" in member.labels
            and "instance-attribute" not in member.labels
        ):
            continue
        arguments = _field_arguments(member)
        if arguments is not None and str(arguments.get("init")) == "False":
            continue
        if arguments is None:
            default = member.value
        else:
            default = arguments.get("default")
        parameters.append(
            griffe.Parameter(
                member.name,
                annotation=member.annotation,
                kind=griffe.ParameterKind.positional_or_keyword,
                default=default,
            )
        )
    return parameters


def _ancestors(cls: griffe.Class) -> list[griffe.Class]:
    try:
        return [c for c in reversed(cls.mro()) if isinstance(c, griffe.Class)]
    except (ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return []


def _set_init(cls: griffe.Class) -> None:
    if "__init__" in cls.members or not _is_module(cls):
        return
    parameters: dict[str, griffe.Parameter] = {}
    for ancestor in [*_ancestors(cls), cls]:
        if "__init__" in ancestor.members and ancestor is not cls:
            continue
        for parameter in _fields(ancestor):
            parameters[parameter.name] = parameter
    cls.set_member(
        "__init__",
        griffe.Function(
            "__init__",
            lineno=0,
            endlineno=0,
            parent=cls,
            parameters=griffe.Parameters(
                griffe.Parameter(
                    "self", kind=griffe.ParameterKind.positional_or_keyword
                ),
                *parameters.values(),
            ),
            returns="None",
        ),
    )


def _walk(obj: griffe.Module | griffe.Class, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if isinstance(obj, griffe.Class):
        _set_init(obj)
    for member in obj.members.values():
        if not member.is_alias and (member.is_module or member.is_class):
            _walk(member, seen)  # pyright: ignore[reportArgumentType]


class EquinoxModules(griffe.Extension):
    """Synthesise `__init__` for Equinox modules (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _walk(pkg, set())
