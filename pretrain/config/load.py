"""Loading: the dataclass defaults, then each `_base_` file (relative to the file naming it, depth first),
then the file itself, then `key.sub=value` overrides. Unknown keys and wrong types raise `UserError`
naming the dotted key; only lossless conversions are made (int -> float, YAML 1.1's `3e-4` string)."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Optional, Union

import fsspec
import yaml

from pretrain.config.schema import Config, validate
from pretrain.errors import UserError, first_line


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- `path` (with its `_base_` chain) <- `key=value` overrides, checked by `validate`.

    The architecture the model section names is not known here: entry points that build a run check it
    with `pretrain.models.check_model_config` after loading."""
    tree: dict = {}
    if path:
        tree = _load_yaml_chain(path, seen=())
    for item in overrides or []:
        _apply_override(tree, item)
    cfg = from_dict(tree)
    validate(cfg)
    return cfg


def split_config_args(config: Optional[str], overrides: list[str]) -> tuple[Optional[str], list[str]]:
    """`CONFIG key=v ...` or just `key=v ...` (the command line's form): a first argument with '=' is an
    override, not a file."""
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, list(overrides)


def from_dict(tree: dict) -> Config:
    """Build a Config from a nested dict, type-checking each value against its field."""
    return _build(Config, tree, prefix="")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


# Keys whose mapping a later file replaces whole: raw DeepSpeed keys are not merged across files.
WHOLE = ("extra",)


def deep_merge(dst: dict, src: dict, whole: tuple[str, ...] = ()) -> dict:
    """`src` merged into `dst` (changed in place, and returned): mappings key by key, anything else (and a
    mapping under a key in `whole`) replaced by a copy of src's value."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k not in whole:
            deep_merge(dst[k], v, whole)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def _read_text(path: str) -> str:
    try:
        with fsspec.open(path, "r") as f:
            return f.read()
    except FileNotFoundError:
        first = path.split(".", 1)[0]
        if "/" not in path and "." in path and first in {f.name for f in dataclasses.fields(Config)}:
            raise UserError(f"{path!r} is neither a config file nor a key=value override "
                            f"(e.g. {path}=VALUE)") from None
        raise UserError(f"config file not found: {path!r}") from None
    except IsADirectoryError:
        raise UserError(f"config file {path!r} is a folder; name a YAML file, e.g. "
                        "configs/pretrain/mae_vit_base_patch16.yaml") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path!r} is not UTF-8 text (byte {e.start}); name a YAML file") from None
    except PermissionError:
        raise UserError(f"config file {path!r} is not readable (permission denied)") from None


def _load_yaml_chain(path: str, seen: tuple) -> dict:
    if path in seen:
        raise UserError(f"_base_ cycle: {' -> '.join(seen + (path,))}")
    try:
        tree = yaml.safe_load(_read_text(path)) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({first_line(e)})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: top level must be a mapping of sections, got {type(tree).__name__}")
    bases = tree.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        base_path = base if "://" in base or base.startswith("/") else _join(_dirname(path), base)
        deep_merge(merged, _load_yaml_chain(base_path, seen + (path,)), whole=WHOLE)
    return deep_merge(merged, tree, whole=WHOLE)


def _dirname(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


def _join(a: str, b: str) -> str:
    return f"{a.rstrip('/')}/{b}"


def _apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise UserError(f"override {item!r} is not key=value (e.g. optim.lr_per_256=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # e.g. a brace pattern that is not valid YAML: keep it as a string
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _build(cls, tree: Any, prefix: str):
    if not isinstance(tree, dict):
        where = f"config key {prefix.rstrip('.')}" if prefix else "config"
        how = "write it as {KEY: VALUE, ...}" if prefix.endswith("].") else f"e.g. {prefix or 'optim.'}KEY=VALUE"
        raise UserError(f"{where}: got {tree!r}, expected a section (a mapping of keys); set its keys, {how}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in tree:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; allowed: {', '.join(names)}"
            raise UserError(f"unknown config key {prefix}{key}{hint}")
    kwargs = {}
    for name in names:
        if name not in tree:
            continue
        typ = hints[name]
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, tree[name], dotted + ".")
        elif typing.get_origin(typ) is list and dataclasses.is_dataclass(typing.get_args(typ)[0]):
            items = tree[name]
            if not isinstance(items, list):
                raise UserError(f"config key {dotted}: got {items!r}, expected a list of sections")
            kwargs[name] = [_build(typing.get_args(typ)[0], item, f"{dotted}[{i}].") for i, item in enumerate(items)]
        else:
            kwargs[name] = _coerce(tree[name], typ, dotted)
    return cls(**kwargs)


def type_name(typ) -> str:
    origin = typing.get_origin(typ)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(typ))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(typ))
    if origin is list:
        return f"list of {type_name(typing.get_args(typ)[0])}"
    if typ is type(None):
        return "null"
    return getattr(typ, "__name__", str(typ))


def _coerce(value: Any, typ, dotted: str) -> Any:
    """Check `value` against `typ`, allowing only lossless conversions (int -> float)."""
    ok, out = _try_coerce(value, typ)
    if not ok:
        if isinstance(value, (float, str)) and _nonfinite(value):
            raise UserError(f"config key {dotted}: got {value!r}, expected a finite number")
        raise UserError(f"config key {dotted}: got {value!r}, expected {type_name(typ)}")
    return out


def _nonfinite(value: Any) -> bool:
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _try_coerce(value: Any, typ) -> tuple[bool, Any]:
    origin = typing.get_origin(typ)
    if typ is Any:
        return True, value
    if origin is Literal:
        return (value in typing.get_args(typ)), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(typ):
            ok, out = _try_coerce(value, arg)
            if ok:
                return True, out
        return False, None
    if typ is type(None):
        return value is None, None
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            return False, None
        (item_t,) = typing.get_args(typ)
        out = []
        for v in value:
            ok, o = _try_coerce(v, item_t)
            if not ok:
                return False, None
            out.append(o)
        return True, out
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if typ is float:  # finite only: an inf or NaN setting only shows as a diverged run
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return math.isfinite(value), float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return math.isfinite(float(value)), float(value)
            except ValueError:
                return False, None
        return False, None
    if typ is str:
        return isinstance(value, str), value
    if typ is dict or origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, typ), value
