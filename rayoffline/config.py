"""Config helpers: frozen dataclasses with one docstring per field.

- `field_docs(cls)` reads the attribute docstrings (the string literal right after each field) from the
  source, so the CLI help and `rayoffline algos` come from the same text the code is read with.
- `from_dict(cls, d, where)` builds a config from YAML / `--set` values, checking keys and types and naming
  the offending key.
- `parse_overrides(["a.b=3", ...])` turns `--set` strings into a nested dict whose values keep their raw
  text (`CliValue`) until `from_dict` parses each against its field's type: `--set progress=off` stays the
  string 'off' for a string field instead of becoming YAML's boolean.
- `load_yaml(text)` reads config files with YAML 1.2 scalars: only true/false are booleans (`progress: off`
  is the string 'off', as written) and `1e-3` is a float.
- Fields marked `member(...)` may differ between the K members trained in one pass; every other field
  must be equal across members (it decides shapes or the optimizer).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from typing import Any

import yaml

from .errors import ConfigError


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema booleans and floats. PyYAML implements YAML 1.1,
    where on/off/yes/no are booleans and 1e-3 (no dot) is a string: both surprise users of config files."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML text with YAML 1.2 booleans and floats (see _Yaml12Loader)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


class CliValue(str):
    """The raw text of a `--set key=value` value. `from_dict` parses it against the type of the field it
    lands in (a string field takes the text as it is); `plain` parses it as YAML where no field type exists."""


def plain(value: Any) -> Any:
    """Replace every CliValue inside `value` (dicts and lists too) with its YAML parse."""
    if isinstance(value, CliValue):
        text = str(value)
        try:
            return load_yaml(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse value {text!r} ({e})") from None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def member(default: Any) -> Any:
    """A per-member coefficient: members of one pass may use different values (stacked to shape (K,))."""
    return dataclasses.field(default=default, metadata={"member": True})


def is_member_field(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("member", False))


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> its attribute docstring, for cls and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(value, CliValue):  # raw `--set` text: a string field takes it as written
        if tp is str:
            return str(value)
        raw = value
        try:
            value = plain(value)
        except ConfigError as e:
            raise ConfigError(f"config key '{key}': {e}") from None
        if origin in (typing.Union, types.UnionType) and str in typing.get_args(tp):
            try:
                return _check_type(value, typing.Union[tuple(a for a in typing.get_args(tp) if a is not str)], key)
            except ConfigError:
                return str(raw)
    if tp is Any:
        return plain(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': {value!r} is not of type {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}': expected null, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 1e5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r} (quote it in YAML, e.g. 'off')")
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    return value


def from_dict(cls: type, d: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict, naming any unknown key or wrong type."""
    d = dict(d or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' for {cls.__name__}; "
                          f"known keys: {', '.join(sorted(names))}")
    kwargs = {k: _check_type(v, hints[k], prefix + k) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # from __post_init__: qualify the key with the section it lives in
        raise ConfigError(str(e).replace("config key '", f"config key '{prefix}", 1)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)

    def fix(v: Any) -> Any:
        if isinstance(v, tuple):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v
    return fix(out)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """["algo.cql_alpha=5", "steps=1000"] -> {"algo": {"cql_alpha": CliValue("5")}, "steps": CliValue("1000")}.

    Values stay raw text until `from_dict` parses them against their field's type."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. algo.cql_alpha=5")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: empty config key")
        merge(out, _nest(key, CliValue(raw.strip())))
    return out


def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    d: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        d = {p: d}
    return d


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `extra` into `base` in place and return it."""
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def require(cond: bool, key: str, msg: str) -> None:
    """For __post_init__: raise a ConfigError naming the key when `cond` is false."""
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")
