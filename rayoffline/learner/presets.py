"""Reference presets: `tune_configs/presets/NAME.yaml`, used as `rayoffline train --preset NAME`.

A preset is a run config (run keys and `algo:` fields) plus what it is for: `algo_name`, `action_space`
(continuous or discrete), `data` (the dataset the reference trained on, e.g. minari:mujoco/hopper/medium-v0;
`--data` replaces it) and `source` (where its numbers come from). It sits below every other config source:
defaults < preset < --config < --set.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import load_yaml
from ..errors import ConfigError

META_KEYS = ("algo_name", "action_space", "data", "source")


def preset_dir() -> Path:
    """$RAYOFFLINE_PRESETS, else tune_configs/presets of the source tree this package runs from."""
    env = os.environ.get("RAYOFFLINE_PRESETS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "tune_configs" / "presets"


def names() -> list[str]:
    d = preset_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load(name: str) -> dict[str, Any]:
    """The preset's mapping (META_KEYS and config keys). An unknown name lists the presets there are."""
    path = preset_dir() / f"{name}.yaml"
    if not path.is_file():
        known = names()
        hint = _closest(name, known)
        listing = _listing(known) if known else f"none found in {preset_dir()}"
        raise ConfigError(f"--preset {name!r}: no such preset{hint}; presets: {listing}")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - a broken preset file names itself
        raise ConfigError(f"{path}: invalid preset file ({e})") from None
    if not isinstance(raw, dict) or "algo_name" not in raw:
        raise ConfigError(f"{path}: a preset is a mapping with algo_name, action_space, source and config keys")
    return raw


def _listing(known: list[str]) -> str:
    """'cql-{antmaze-umaze, hopper-medium}, iql-{...}': the names grouped by their algorithm prefix."""
    groups: dict[str, list[str]] = {}
    for n in known:
        head, _, rest = n.partition("-")
        groups.setdefault(head, []).append(rest)
    return "; ".join(f"{head}-{{{', '.join(rest)}}}" if len(rest) > 1 else f"{head}-{rest[0]}"
                     for head, rest in groups.items())


def _closest(name: str, known: list[str]) -> str:
    import difflib
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def apply(name: str, algo: str | None, data: str | None, config: dict[str, Any] | None,
          drop: Any = (), data_key: str = "--data") -> tuple[dict[str, Any], str, str]:
    """(the config with the preset beneath it, the algorithm, the dataset).
    An --algo other than the preset's is an error naming both. `drop`: dotted keys the preset leaves to
    someone else (a sweep's searched keys). `data_key`: how the caller's dataset is given, for the errors."""
    from ..config import merge
    raw = dict(load(name))
    for key in drop:
        *parents, last = str(key).split(".")
        d = raw
        for part in parents:
            d = d.get(part) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.pop(last, None)
    p_algo = str(raw.pop("algo_name"))
    p_data = raw.pop("data", None)
    raw.pop("action_space", None)
    raw.pop("source", None)
    if algo is not None and algo != p_algo:
        mine = [n for n in names() if n.startswith(f"{algo}-")]
        raise ConfigError(f"--preset {name!r} is for algorithm {p_algo!r}, not {algo!r}; "
                          + (f"presets for {algo}: {_listing(mine)}" if mine else f"there are no presets for {algo}"))
    if data is None and p_data is not None and str(p_data).startswith("minari:"):
        raise ConfigError(f"--preset {name!r} trains on {p_data}: convert it once with `rayoffline data convert "
                          f"{p_data} --out DIR` and pass {data_key} DIR")
    if data is None and p_data is None:
        raise ConfigError(f"--preset {name!r} names no dataset (Minari hosts none for it; see its comments): pass "
                          f"{data_key} DIR, e.g. a D4RL file converted with `rayoffline data convert FILE.hdf5 --out DIR`")
    merged = merge(raw, config or {})
    return merged, p_algo, data if data is not None else str(p_data)


def check_action_space(name: str, meta: dict[str, Any], data: str) -> None:
    """Refuse a preset made for another action space (its `action_space`, default continuous) than the
    dataset's, naming both."""
    from ..spec import EnvSpec
    space = str(load(name).get("action_space", "continuous"))
    spec = EnvSpec.from_metadata(meta)
    kind = "discrete" if spec.discrete else "continuous"
    if kind != space:
        shown = f"Discrete({spec.action_dim})" if spec.discrete else f"Box({spec.action_dim},)"
        raise ConfigError(f"--preset {name!r} is for {space} actions, but {data} has {kind} actions ({shown}); its "
                          f"settings do not transfer (choose a preset for {kind} actions, or none)")
