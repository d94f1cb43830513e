"""From a YAML file and `key.sub=value` overrides to a validated config: the overrides are merged onto the file
and both onto the job's own defaults, and pydantic's errors are rewritten to name the key and the file."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from rlhf_cluster.lib.config.base import ConfigError, JobConfig, preset_or_path, presets
from rlhf_cluster.lib.config.keys import did_you_mean

C = TypeVar("C", bound=JobConfig)


def parse_overrides(overrides: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _describe(err: ValidationError, cls: type[BaseModel] | None = None) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key" + did_you_mean(cls, key))
        else:
            got = e.get("input")
            lines.append(f"{key}: {e['msg']}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] = ()) -> C:
    data: dict = {}
    if path is not None:
        path = preset_or_path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (a preset is named without its .yaml: "
                              f"{', '.join(presets())})")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}")
        data = loaded
    data = _merge(data, parse_overrides(list(overrides)))
    # Merge onto the job's own defaults, so a file that sets one key of a section keeps the
    # job-specific defaults of the others (e.g. PPO's trainer learning rate).
    data = _merge(cls().model_dump(), data)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        where = (f" in {path}" + (" or the overrides" if overrides else "")) if path else ""
        raise ConfigError(_describe(e, cls).replace("invalid configuration", f"invalid configuration{where}", 1)
                          ) from None
