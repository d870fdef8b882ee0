"""The method registry: `model.method` names -> the model class, its args and search space.

A method registers itself where it is defined (in the style of timm's model registry):

    @dataclass
    class FooArgs:
        width: int = 64
        mode: str = "a"

    @register_method("foo", args=FooArgs, search_space="foo.yaml", choices={"mode": {"a", "b"}})
    class Foo(FusionMethod): ...

That is all a new method needs (plus its search-space YAML): the config's `model.method`
choices, its `method_args.<section>` (a dataclass built from every registered args class, in
registration order), the allowed values of its fields, its validation, `cfcml cv --methods`
and `build_method` all read this registry. The built-in methods register when
`cfcml.models.methods` is imported.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SEARCH_SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"  # package data


class MethodRegistryError(ValueError):
    """A registration that would make `model.method` ambiguous or `method_args` inconsistent."""


@dataclass(frozen=True)
class MethodEntry:
    name: str  # the `model.method` value
    cls: type  # built as cls(cfg, shape, num_tabular_features)
    args: type | None = None  # the dataclass of `method_args.<section>` (None: no section)
    section: str | None = None  # the `method_args` section it reads (methods may share one)
    search_space: str | None = None  # a file in cfcml/search_spaces/ (None: the preset's space)
    on_cfcml: bool = False  # built on CFCML's MG-CIE model: it may drop a modality and uses every stage
    choices: Mapping[str, frozenset] = field(default_factory=dict)  # args field -> its allowed values
    check: Callable | None = None  # check(cfg, selected: bool) -> [problem, ...] (config validation)
    display: str = ""  # its name in tables (default: the `model.method` value)


_METHODS: dict[str, MethodEntry] = {}


def register_method(
    name: str,
    *,
    args: type | None = None,
    section: str | None = None,
    search_space: str | None = None,
    on_cfcml: bool = False,
    choices: Mapping[str, set] | None = None,
    check: Callable | None = None,
    display: str | None = None,
) -> Callable[[type], type]:
    """Class decorator: register `cls` as `model.method=name` (see the module docstring).

    `section` defaults to `name` when the method has `args`; a method sharing another's
    section must name the same args class. Raises MethodRegistryError on a duplicate name.
    """

    def decorate(cls: type) -> type:
        entry = MethodEntry(
            name=name,
            cls=cls,
            args=args,
            section=(section or name) if args is not None else None,
            search_space=search_space,
            on_cfcml=on_cfcml,
            choices={k: frozenset(v) for k, v in (choices or {}).items()},
            check=check,
            display=display or name,
        )
        _validate(entry)
        _METHODS[name] = entry
        return cls

    return decorate


def _validate(entry: MethodEntry) -> None:
    who = f"{entry.cls.__module__}.{entry.cls.__qualname__}"
    if not entry.name.isidentifier():
        raise MethodRegistryError(f"{who}: method name {entry.name!r} must be an identifier")
    if entry.name in _METHODS:  # two methods, one name: the config could not tell them apart
        first = _METHODS[entry.name].cls
        raise MethodRegistryError(
            f"{who}: model.method {entry.name!r} is already registered by {first.__module__}.{first.__qualname__}; "
            "choose another name"
        )
    if entry.args is not None and not dataclasses.is_dataclass(entry.args):
        raise MethodRegistryError(f"{who}: args must be a dataclass, got {entry.args!r}")
    shared = args_sections().get(entry.section)
    if entry.section is not None and shared is not None and shared is not entry.args:
        raise MethodRegistryError(
            f"{who}: method_args.{entry.section} is already read as {shared.__qualname__}, not {entry.args.__qualname__}"
        )
    names = {f.name for f in dataclasses.fields(entry.args)} if entry.args is not None else set()
    unknown = sorted(set(entry.choices) - names)
    if unknown:
        raise MethodRegistryError(f"{who}: choices name field(s) {unknown} that {entry.args!r} does not have")
    if entry.search_space is not None and not (SEARCH_SPACES_DIR / entry.search_space).is_file():
        raise MethodRegistryError(f"{who}: search space {entry.search_space!r} is not in {SEARCH_SPACES_DIR}")


def method_names() -> tuple[str, ...]:
    """Every registered `model.method`, in registration order."""
    return tuple(_METHODS)


def method_entry(name: str) -> MethodEntry:
    if name not in _METHODS:
        raise ValueError(f"unknown model.method {name!r}; expected one of {', '.join(_METHODS)}")
    return _METHODS[name]


def method_class(name: str) -> type:
    return method_entry(name).cls


def search_space_path(name: str) -> Path | None:
    """The search-space file the method ships (None: it tunes with the preset's space)."""
    entry = method_entry(name)
    return None if entry.search_space is None else SEARCH_SPACES_DIR / entry.search_space


def args_sections() -> dict[str, type]:
    """`method_args` section -> its args dataclass, in registration order."""
    sections: dict[str, type] = {}
    for entry in _METHODS.values():
        if entry.section is not None:
            sections.setdefault(entry.section, entry.args)
    return sections


def method_args_type() -> type:
    """The dataclass of the config's `method_args` section: one field per registered section."""
    return _method_args_type(tuple(args_sections().items()))


@functools.cache
def _method_args_type(sections: tuple[tuple[str, type], ...]) -> type:
    cls = dataclasses.make_dataclass(
        "MethodArgs", [(name, args, field(default_factory=args)) for name, args in sections]
    )
    cls.__module__ = __name__  # found as cfcml.models.registry.MethodArgs (see __getattr__)
    cls.__doc__ = "The config's `method_args`: one section per registered method's args (cfcml.models.registry)."
    return cls


def __getattr__(name: str):
    # `cfcml.models.registry.MethodArgs` is the current type, so a Config pickles by reference
    if name == "MethodArgs":
        return method_args_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def method_choices() -> dict[str, set]:
    """The config's allowed values that the registry decides: `model.method` and every
    registered args field with choices (`method_args.<section>.<field>`)."""
    out: dict[str, set] = {"model.method": set(_METHODS)}
    for entry in _METHODS.values():
        for name, values in entry.choices.items():
            out[f"method_args.{entry.section}.{name}"] = set(values)
    return out


def foreign_method_args(values: dict) -> tuple[str, list[str]]:
    """(the selected method, the `method_args` sections a preset/override dict sets for another
    method): those would be silently ignored, so the config refuses them."""
    model, given = values.get("model"), values.get("method_args")
    method = model.get("method", "cfcml") if isinstance(model, dict) else "cfcml"
    wanted = _METHODS[method].section if method in _METHODS else None
    if not isinstance(given, dict):
        return method, []  # the config's type check reports it
    return method, sorted(f"method_args.{s}" for s in given if s != wanted)


def method_config_problems(cfg) -> list[str]:
    """Settings a method cannot run with (checked once, when the config is built): every
    registered check sees the config (its own section is validated even when another method
    is selected, e.g. a saved config reloaded)."""
    m = cfg.model
    problems = []
    if m.method in _METHODS and not _METHODS[m.method].on_cfcml and not (m.use_images and m.use_tabular):
        problems.append(
            f"model.method={m.method} fuses images and the table: it needs model.use_images and model.use_tabular"
        )
    selected = _METHODS[m.method].check if m.method in _METHODS else None
    seen = set()
    for entry in _METHODS.values():
        if entry.check is not None and entry.check not in seen:  # methods sharing a section share its check
            seen.add(entry.check)
            problems += entry.check(cfg, entry.check is selected)
    return problems
