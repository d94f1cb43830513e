"""The config keys as people read them: the `--help` listing (type, the job's own default, the field's docstring)
and the suggestion for a mistyped key. Both come from the models, so a new field is documented where it is
declared."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


def _description(cls: type[BaseModel], name: str) -> str:
    """A field's docstring, from the class that defines it or the nearest base class that documents it."""
    for klass in cls.__mro__:
        info = getattr(klass, "model_fields", {}).get(name)
        if info is not None and info.description:
            return " ".join(info.description.split())
    return ""


def _type_name(annotation) -> str:
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    return getattr(annotation, "__name__", str(annotation))


def _section(annotation) -> type[BaseModel] | None:
    """The config model a field holds (also when it may be null), else None."""
    import typing

    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def config_keys(cls: type[BaseModel], defaults: BaseModel | None = None, prefix: str = "") -> list[tuple]:
    """(dotted key, type, default, description) of every key of `cls`, its sections' keys after them;
    defaults are the job's own (e.g. PPO's trainer learning rate), not the section class's."""
    import json

    rows = []
    for name, info in cls.model_fields.items():
        value = getattr(defaults, name) if defaults is not None else (
            info.get_default(call_default_factory=True) if not info.is_required() else None)
        section = _section(info.annotation)
        shown = "(section)" if isinstance(value, BaseModel) else (
            "required" if info.is_required() and defaults is None else json.dumps(
                value.model_dump(mode="json") if isinstance(value, BaseModel) else value, default=str))
        rows.append((prefix + name, _type_name(info.annotation), shown, _description(cls, name)))
        if section is not None and not isinstance(value, list):
            rows += config_keys(section, value if isinstance(value, BaseModel) else None, prefix + name + ".")
    return rows


def keys_help(cls: type[BaseModel]) -> str:
    """The config keys as `--help` lists them."""
    rows = config_keys(cls, cls())
    width = min(44, max(len(k) for k, *_ in rows))
    lines = ["config keys (set in the --config file or as key.sub=value; in brackets the job's own default,"
             " before any file: --print-config shows what a run would use):"]
    for key, kind, default, text in rows:
        lines.append(f"  {key:<{width}} {kind} [{default}]" + (f"\n  {'':<{width}}   {text}" if text else ""))
    return "\n".join(lines)


def did_you_mean(cls: type[BaseModel] | None, key: str) -> str:
    """ " (did you mean trainer.zero_stage?)" for a mistyped dotted key, or ""."""
    import difflib

    if cls is None:
        return ""
    known = [k for k, *_ in config_keys(cls, None)]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
