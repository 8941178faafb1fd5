"""Building configs: YAML files, dotted overrides, type coercion, saving."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, cast, get_args, get_origin

import yaml

from .errors import ConfigError

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Type coercion
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(_type_name(a) if a is not Ellipsis else "..." for a in get_args(tp))
        return f"{origin.__name__}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _parse_scalar_text(text: str) -> Any:
    """Parse command-line text as YAML, so ``[1, 2]``, ``true``, ``null`` and ``{a: 1}`` work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``key``."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if tp is bool:
        return _coerce_bool(value, key)
    if tp is int:
        return _coerce_int(value, key)
    if tp is float:
        return _coerce_float(value, key)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _mismatch(value, tp, key)
    if origin in (list, tuple):
        return _coerce_sequence(value, tp, key)
    if origin is dict:
        return _coerce_dict(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _mismatch(value, tp, key)
        return _build(cast("type[Any]", tp), value, key)
    if isinstance(value, tp):
        return value
    raise _mismatch(value, tp, key)


def _mismatch(value: Any, tp: Any, key: str) -> ConfigError:
    """The error for ``value`` at ``key`` that is no ``tp``: names the key, the type and the value."""
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """``null`` / ``none`` for an optional type, else the first member type ``value`` converts to."""
    args = get_args(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        if type(None) in args:
            return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError:
            continue
    raise _mismatch(value, tp, key)


def _coerce_bool(value: Any, key: str) -> bool:
    """A bool, or its text (``true``/``false``, ``yes``/``no``, ``1``/``0``, any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise _mismatch(value, bool, key)


def _coerce_int(value: Any, key: str) -> int:
    """An int, a float or text with an integer value (``2``, ``2.0``, ``"2e3"``); never a bool."""
    if isinstance(value, bool):
        raise _mismatch(value, int, key)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                raise _mismatch(value, int, key) from None
            if as_float.is_integer():
                return int(as_float)
    raise _mismatch(value, int, key)


def _coerce_float(value: Any, key: str) -> float:
    """An int, a float or number text as a float; never a bool."""
    if isinstance(value, bool):
        raise _mismatch(value, float, key)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise _mismatch(value, float, key) from None
    raise _mismatch(value, float, key)


def _coerce_sequence(value: Any, tp: Any, key: str) -> list[Any] | tuple[Any, ...]:
    """A list or tuple (or its YAML text, or comma-separated text), each item converted.

    A fixed-length tuple type (``tuple[int, int]``) needs exactly that many items.
    """
    origin = get_origin(tp)
    if isinstance(value, str):
        parsed = _parse_scalar_text(value)
        value = parsed if isinstance(parsed, (list, tuple)) else [v for v in value.split(",") if v]
    if not isinstance(value, (list, tuple)):
        raise _mismatch(value, tp, key)
    args = get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {list(value)!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_dict(value: Any, tp: Any, key: str) -> dict[Any, Any]:
    """A mapping (or its YAML text), keys and values converted."""
    if isinstance(value, str):
        value = _parse_scalar_text(value)
    if not isinstance(value, dict):
        raise _mismatch(value, tp, key)
    kt, vt = get_args(tp) or (Any, Any)
    return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, name: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    valid_txt = ", ".join(prefix + v for v in valid)
    return ConfigError(f"unknown config key {key!r}.{hint} Valid keys here: {valid_txt}")


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a (possibly partial) nested dict, validating keys/types."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if f.init}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key(key, str(name), list(fields))
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[name] = _build(cast("type[Any]", tp), value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if exc.field is not None and exc.detail is not None:  # name the key as typed: train.batch_size
            key = f"{prefix}.{exc.field}" if prefix else exc.field
            raise ConfigError(f"{key} {exc.detail}") from None
        raise


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config (tuples become lists) for YAML/JSON."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(cfg)


def _merge(base: dict[str, Any], update: dict[str, Any], cls: type) -> dict[str, Any]:
    """Merge a YAML tree into ``base``.

    Config sections merge key by key, while free-form dict fields (``loss.weights``,
    ``optim.lr_mult``, ``model.overrides``...) are replaced whole, so a file that says
    ``weights: {ce: 1, dice: 1}`` means exactly those terms.
    """
    out = dict(base)
    hints = _hints(cls)
    for k, v in update.items():
        tp = hints.get(k)
        if isinstance(v, dict) and isinstance(out.get(k), dict) and dataclasses.is_dataclass(tp):
            out[k] = _merge(out[k], v, cast(type, tp))
        else:
            out[k] = v
    return out


def _set_dotted(tree: dict[str, Any], cls: type, dotted: str, text: str) -> None:
    """Set ``a.b.c=text`` in the nested dict ``tree``, checking each key against ``cls``."""
    parts = dotted.split(".")
    node = tree
    current: Any = cls
    for i, part in enumerate(parts):
        key = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(current):
            # a free-form dict field (e.g. model.overrides.depth=2): everything below is data
            node[part] = _parse_scalar_text(text) if i == len(parts) - 1 else node.get(part, {})
            if i < len(parts) - 1:
                node = node[part]
            continue
        fields = {f.name for f in dataclasses.fields(current) if f.init}
        if part not in fields:
            raise _unknown_key(key, part, sorted(fields))
        tp = _hints(cast(type, current))[part]
        if i == len(parts) - 1:
            node[part] = text if tp is str or _accepts_str(tp) else _parse_scalar_text(text)
            return
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
        if dataclasses.is_dataclass(tp):
            current = tp
        elif get_origin(tp) is dict:
            current = None
        else:
            raise ConfigError(
                f"{key} is a {_type_name(tp)}, it has no sub-keys (got override {dotted}={text})"
            )


def _accepts_str(tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_accepts_str(a) for a in get_args(tp))
    if origin is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    return tp is str


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Return a new config with ``key=value`` overrides applied (validated, typed)."""
    tree = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=10)")
        key, text = item.split("=", 1)
        _set_dotted(tree, type(cfg), key.strip(), text)
    return _build(type(cfg), tree)


def load_config(cls: type[T], config_path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls`` <- YAML file <- dotted overrides; every key and type validated."""
    tree: dict[str, Any] = config_to_dict(cls())
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        try:
            _build(cls, loaded)  # validate the file on its own so errors name it
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        tree = _merge(tree, loaded, cls)
    cfg = _build(cls, tree)
    return apply_overrides(cfg, overrides) if overrides else cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)
    os.replace(tmp, path)
