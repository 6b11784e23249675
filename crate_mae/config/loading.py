"""Configs from YAML files and `--set KEY=VALUE` overrides, checked against the section dataclasses; saved back.

Every value is checked against its field's annotation on the way in (`_coerce`), so a wrong type is a
`ConfigError` naming the key and where it came from, before any dataclass check runs.
"""
from __future__ import annotations

import argparse
import difflib
import os
import types
import typing
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from crate_mae.atomic import atomic_path
from crate_mae.config.sections import STAGES, Config, ConfigError


# ----------------------------------------------------------------------------- typing and coercion

def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Optional[X] → (X, True); X → (X, False)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a non-empty list of {_type_name(args[0])}"
        return "a list of " + ", ".join(_type_name(a) for a in args)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert the lossless cases (int → float)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: expected {_type_name(inner)}, got null")
    origin = typing.get_origin(inner)
    if origin is Literal:
        if value in typing.get_args(inner):
            return value
    elif origin is tuple:
        args = typing.get_args(inner)
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, (list, tuple)) and value:
            args = (args[0],) * len(value)  # tuple[X, ...]: any non-empty length
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif inner is bool:
        if isinstance(value, bool):
            return value
    elif inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif inner is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{key}: unsupported annotation {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(inner)}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}'{hint}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Construct dataclass `cls` from a nested dict, checking every key and type on the way."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'top level'}: expected a mapping, got {data!r}")
    hints, names = _hints(cls), [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown(prefix + str(key), names)
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        kwargs[name] = _build(tp, value, f"{prefix}{name}.") if is_dataclass(tp) else _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _parse_override(item: str, schema: type) -> tuple[list[str], Any]:
    """'optim.lr=1e-4' → (['optim', 'lr'], 0.0001), parsed by the type of the field it names."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
    key, raw = item.split("=", 1)
    path, cls = key.strip().split("."), schema
    for depth, part in enumerate(path):
        names = [f.name for f in fields(cls)] if is_dataclass(cls) else []
        if part not in names:
            raise ConfigError(f"--set {item!r}: " + str(_unknown(".".join(path[: depth + 1]), names)))
        cls = _hints(cls)[part]
    if is_dataclass(cls):
        raise ConfigError(f"--set {item!r}: '{key}' is a section; set one of its keys, e.g. {key}.{fields(cls)[0].name}=...")
    inner, optional = _unwrap_optional(cls)
    if inner is str or (typing.get_origin(inner) is Literal and all(isinstance(a, str) for a in typing.get_args(inner))):
        value: Any = None if optional and raw.strip().lower() in ("null", "none", "~") else raw
    else:
        value = yaml.safe_load(raw) if raw.strip() else None
    try:
        return path, _coerce(value, cls, key)
    except ConfigError as err:
        raise ConfigError(f"--set {item!r}: {err}") from None


def _schema(stage: str) -> type:
    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    return STAGES[stage]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, section by section (a key of `over` wins)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config as a dict; a top-level `base: FILE` (relative to this file) is read first and overridden."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected the path of another config file, got {base!r}")
    base_path = path.parent / base
    if base_path.resolve() in {p.resolve() for p in (*chain, path)}:
        raise ConfigError(f"{path}: base: {base} includes itself")
    return _merge(_read_yaml(base_path, (*chain, path)), data)


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (), *,
                stage: str = "pretrain") -> Config:
    """The defaults of `stage`'s config (pretrain, linprobe, finetune: each holds only its own sections),
    updated by the YAML file at `path` (if any; with its `base` file first), then by each `KEY=VALUE` override."""
    schema = _schema(stage)
    data: dict[str, Any] = {}
    origin = "the defaults"
    if path is not None:
        origin = str(path)
        data = _read_yaml(Path(path))
    for item in overrides:
        keys, value = _parse_override(item, schema)
        node = data
        for part in keys[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[keys[-1]] = value
    if overrides:
        origin += " with --set " + " ".join(overrides)
    try:
        return _build(schema, data, "")
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of the config (tuples become lists, as YAML writes them)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return list(value) if isinstance(value, tuple) else value
    return plain(asdict(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (a temp file in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_help(cls: type = Config, prefix: str = "") -> str:
    """One line per key: `section.key  default  doc`, for `--help`."""
    lines = []
    for f in fields(cls):
        tp = _hints(cls)[f.name]
        if is_dataclass(tp):
            lines.append(config_help(tp, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not MISSING else "?"
            lines.append(f"  {prefix + f.name:<22} {default!r:<12} {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def add_config_args(parser: argparse.ArgumentParser, default_config: str | None = None, *, stage: str = "pretrain") -> None:
    """`--config FILE` and `--set KEY=VALUE ...` (repeatable), with every key of `stage`'s config listed in `--help`."""
    parser.add_argument("--config", default=default_config, metavar="FILE",
                        help=f"YAML file of values that differ from the defaults; it may name a `base: FILE` whose "
                             f"values it overrides (default: {default_config})")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set optim.lr=1e-4 model.variant=small (repeatable)")
    parser.set_defaults(config_stage=stage)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (parser.epilog or "") + "\nconfig keys (--set KEY=VALUE), defaults and meaning:\n" + \
        config_help(_schema(stage))


def config_from_args(args: argparse.Namespace) -> Config:
    """The config named by parsed `add_config_args` arguments."""
    return load_config(args.config, [item for group in args.overrides for item in group], stage=args.config_stage)
