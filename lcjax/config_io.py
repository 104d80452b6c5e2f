"""Load, override and dump `Config` trees: YAML presets plus dotted `key=value` overrides.

A YAML file is a partial override of the dataclass defaults in `lcjax.config` (top-level keys
`model`, `mesh`, `runtime`; nested dataclasses as nested mappings). Overrides such as
`model.moe.dispatch=dense` are applied after the file. Values are coerced by the dataclass field
type, unknown keys are rejected with the closest valid keys, and every dataclass is rebuilt
through its constructor so `__post_init__` validation runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import pathlib
import types
import typing
from typing import Any, Mapping, Sequence, Union

import yaml

from lcjax.config import Config

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PRESET_DIR = REPO_ROOT / "configs" / "models"

_NONE_WORDS = ("none", "null", "~")


@dataclasses.dataclass(frozen=True)
class _Raw:
    """An override value as typed on the command line, parsed lazily by the field type.

    Kept raw so string fields see the literal text: YAML would read `0110` as octal 72.
    """

    text: str


# ---------------------------------------------------------------- public API


def load_config(path: str | os.PathLike | Sequence | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file(s) at `path` (None = none; a list applies in order, later
    files winning key by key), then dotted `key=value` overrides.

    Raises ValueError naming the dotted key (and the closest valid keys) for unknown keys,
    values of the wrong type and values the dataclass validation rejects.
    """
    return load_dataclass(Config(), path, overrides)


def load_dataclass(base: Any, path: str | os.PathLike | Sequence | None, overrides: Sequence[str] = ()) -> Any:
    """`load_config` for any config dataclass tree: `base` (an instance holding the defaults)
    with the YAML file(s) and then the overrides applied, validated the same way."""
    paths = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    tree: dict = {}
    for p in paths:
        tree = _merge(tree, _read_yaml(p))
    for override in overrides:
        key, raw = _parse_override(override)
        _set_dotted(tree, key, _Raw(raw))
    return _build(base, tree, "")


def config_to_dict(cfg: Config) -> dict:
    """The whole tree as plain nested dicts (every field, defaults included)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML that `load_config` reads back to an equal Config."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    pathlib.Path(path).write_text(text)


def resolve_config_path(name_or_path: str | os.PathLike) -> pathlib.Path:
    """An existing path as given, or a bare preset name (`tiny`) as `configs/models/tiny.yaml`.

    Preset names are looked up next to the package (repo root = parent of `lcjax/`), so CLIs
    work from any working directory.
    """
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    if not path.is_absolute() and (REPO_ROOT / path).is_file():
        return REPO_ROOT / path
    text = str(name_or_path)
    is_bare = os.sep not in text and "/" not in text
    if is_bare:
        preset = PRESET_DIR / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
        if preset.is_file():
            return preset
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(path.stem, names, n=3)
    hint = f"; did you mean {_or_list(close)}?" if close else ""
    raise ValueError(f"config {text!r} is neither a file nor a preset in {PRESET_DIR} "
                     f"(presets: {', '.join(names)}){hint}")


# ---------------------------------------------------------------- reading inputs


def _read_yaml(path: str | os.PathLike) -> dict:
    """Parse a YAML file whose top level must be a mapping (an empty file is {})."""
    with open(path) as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"config file {os.fspath(path)!r}: top level must be a mapping of "
                         f"sections {[f.name for f in dataclasses.fields(Config)]}, "
                         f"got {type(data).__name__}")
    return dict(data)


def _merge(base: dict, update: Mapping) -> dict:
    """Deep-merge two section trees; values of `update` win, nested mappings merge."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(override: str) -> tuple[str, str]:
    """Split `a.b.c=value` into its key and raw value text."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"config override {override!r} is not of the form 'dotted.key=value'")
    return key, raw.strip()


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    """Place `value` at dotted `key` in a nested dict; the override wins over a YAML scalar."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = dict(child) if isinstance(child, Mapping) else {}
            node[part] = child
        node = child
    node[leaf] = value


# ---------------------------------------------------------------- building dataclasses


def _build(base: Any, mapping: Any, prefix: str) -> Any:
    """`base` (a dataclass instance) with the fields in `mapping` replaced, via its constructor."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"config key {prefix!r} is a section: expected a mapping of "
                         f"{_field_names(type(base))}, got {_show(mapping)}")
    hints = _type_hints(type(base))
    changes = {}
    for name, value in mapping.items():
        key = _join(prefix, str(name))
        if name not in hints:
            raise ValueError(_unknown_key_message(key, type(base), prefix))
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):
            changes[name] = _build(current, value, key)
        else:
            changes[name] = _coerce(key, value, hints[name])
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as e:
        where = f" (in config section {prefix!r})" if prefix else ""
        raise ValueError(f"{e}{where}") from e


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved field types (config.py uses postponed annotations, so they are strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# ---------------------------------------------------------------- value coercion


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (YAML-parsed or a raw override) to field type `tp`, or raise naming `key`."""
    optional, tp = _unwrap_optional(tp)
    if isinstance(value, _Raw):
        if optional and value.text.lower() in _NONE_WORDS:
            return None
        value = _unquote(value.text) if tp is str else _parse_raw(key, value.text)
    if value is None and optional:
        return None
    if isinstance(value, Mapping):
        sub = _join(key, str(next(iter(value), "")))
        raise ValueError(f"unknown config key {sub!r}: {key!r} is not a section")
    converter = _CONVERTERS.get(tp)
    if converter is None:
        raise TypeError(f"config_io cannot coerce field type {tp!r} of {key!r}")
    return converter(key, value)


def _parse_raw(key: str, text: str) -> Any:
    """Parse override text as a YAML scalar (ints, floats, bools, null); '' stays ''."""
    if not text:
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"config key {key!r}: cannot parse value {text!r}: {e}") from e


def _unwrap_optional(tp: Any) -> tuple[bool, Any]:
    """(True, X) for Optional[X] / X | None, else (False, tp)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return True, args[0]
    return False, tp


def _unquote(text: str) -> str:
    """Strip one pair of matching quotes, so `key="01"` and `key=01` mean the same."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config key {key!r} expects an integer, got {_show(value)}")
    return value


def _to_float(key: str, value: Any) -> float:
    """Ints widen to float; strings like '1e7' (PyYAML 1.1 reads them as str) are parsed."""
    if isinstance(value, bool):
        raise ValueError(f"config key {key!r} expects a number, got {_show(value)}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"config key {key!r} expects a number, got {_show(value)}")


def _to_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"config key {key!r} expects true or false, got {_show(value)}")
    return value


def _to_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"config key {key!r} expects a string, got {_show(value)} "
                         "(quote it in YAML, e.g. '0110')")
    return value


_CONVERTERS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}


# ---------------------------------------------------------------- error messages


def _unknown_key_message(key: str, cls: type, prefix: str) -> str:
    """`unknown config key 'a.b'; did you mean 'a.c'?`, searching this level, then the tree."""
    # Match on the last component: the shared dotted prefix would make every key look close.
    leaf = key.rsplit(".", 1)[-1]
    level = [_join(prefix, name) for name in _field_names(cls)]
    close = [_join(prefix, n) for n in difflib.get_close_matches(leaf, _field_names(cls), n=3)]
    if not close:
        close = [k for k in _all_keys(Config) if k.rsplit(".", 1)[-1] == leaf][:3]
    if close:
        return f"unknown config key {key!r}; did you mean {_or_list(close)}?"
    return f"unknown config key {key!r}; valid keys here: {', '.join(level)}"


@functools.lru_cache(maxsize=None)
def _all_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key under `cls`, sections and leaves."""
    keys: list[str] = []
    hints = _type_hints(cls)
    for name, tp in hints.items():
        key = _join(prefix, name)
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, key))
    return tuple(keys)


def _or_list(items: Sequence[str]) -> str:
    quoted = [repr(i) for i in items]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _show(value: Any) -> str:
    if isinstance(value, _Raw):
        return repr(value.text)
    return f"{value!r} ({type(value).__name__})"
