"""The sweep file of `rayoffline tune SWEEP.yaml`: validated into a `Sweep`, turned into Ray Tune objects.

    algo: cql                          # required (unless a preset names it)
    data: builtin:pendulum-medium      # required: a converted dataset directory, builtin:NAME or a URI
    preset: cql-hopper-medium          # optional: reference settings beneath config: (tune_configs/presets)
    config:                            # optional: fixed run keys and `algo:` fields, as in a `train --config` file
      steps: 20000
      log_every: 1000                  # Tune gets one result per log_every steps
      eval_every: 5000
      algo: {hidden: [256, 256]}
    space:                             # dotted config keys -> one distribution each
      algo.cql_alpha: {grid: [0.5, 1, 2, 5, 10]}
      batch_size: {choice: [256, 1024]}
      algo.critic_lr: {loguniform: [1.0e-4, 1.0e-3]}
      algo.tau: {uniform: [0.001, 0.01]}        # also quniform [lo, hi, q], qloguniform [lo, hi, q],
      algo.cql_n_actions: {randint: [4, 16]}    # randint [lo, hi) and qrandint [lo, hi, q] (hi included)
    seeds: 3                           # n -> [0 .. n-1], or a list; every configuration trains each seed
    num_samples: 1                     # Tune's num_samples (grid entries multiply it, as in Tune)
    metric: eval/return_mean           # what schedulers and the ranking use (default eval/return_mean)
    mode: max                          # max (default) | min
    scheduler: {type: asha, grace_period: 2000, reduction_factor: 2}   # fifo (default) | asha | pbt
    search: {type: random}             # random (default) | grid | optuna (options sampler: tpe|random, seed)
    resources: {cpus: 1, gpus: 0}      # per pack (fused) or per trial (unfused); with workers: N (unfused only,
                                       # N Ray Train workers per trial) cpus and gpus are per worker
    max_concurrency: 8                 # trials running at once (0: no limit)
    pack_size: auto                    # auto | N: most members in one fused pack
    fuse: true                         # false: one process per configuration (no packs)
    max_failures: 1                    # retries of a trial that raises (-1: unlimited)
    name: cql-sweep                    # experiment name (default: the file's stem, else "sweep")

Scheduler options (steps are member steps; Tune's time_attr is the result's "step"):
  asha: grace_period (default: the first result carrying the metric), reduction_factor (default 4),
        max_t (default: config steps), brackets (default 1)
  pbt:  perturbation_interval (required), hyperparam_mutations (dotted space key -> a distribution as in
        `space` or a list of values; required), quantile_fraction (0.25), resample_probability (0.25)

A trial's config is flat: dotted space keys -> sampled values. `pack_fields` turns it into the run config
and the key of the fused pack it belongs to: configurations that differ only in per-member coefficients
(`member_keys`) share a pack. Ray Tune is imported only by the functions that build Tune objects.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import algorithms
from ..config import CliValue, is_member_field, load_yaml, merge, parse_overrides, plain, to_dict
from ..errors import ConfigError
from ..learner.config import RUN_KEYS, build_config, nest_dotted

KINDS = ("grid", "choice", "uniform", "quniform", "loguniform", "qloguniform", "randint", "qrandint")
TOP_KEYS = ("algo", "data", "preset", "config", "space", "seeds", "num_samples", "metric", "mode", "scheduler",
            "search", "resources", "max_concurrency", "pack_size", "fuse", "max_failures", "name")
SCHEDULER_OPTIONS = {
    "fifo": (),
    "asha": ("grace_period", "reduction_factor", "max_t", "brackets"),
    "pbt": ("perturbation_interval", "hyperparam_mutations", "quantile_fraction", "resample_probability"),
}
SEARCH_OPTIONS = {"random": (), "grid": (), "optuna": ("sampler", "seed")}
RESOURCE_KEYS = ("cpus", "gpus", "workers")

_STRING_KEYS = ("algo", "data", "metric", "mode", "name")  # `--set` takes their text as written
_WHOLE_KEY_SECTIONS = ("space.", "scheduler.hyperparam_mutations.")  # the rest of a `--set` key is one key
_FROM_RESOURCES = {"num_workers": "resources.workers", "cpus_per_worker": "resources.cpus",
                   "gpus_per_worker": "resources.gpus"}
_EPS = 1e-9


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file (see the module docstring); scheduler and search carry their defaults."""

    algo: str
    data: str
    config: dict[str, Any]
    space: dict[str, dict[str, list[Any]]]
    seeds: list[int]
    num_samples: int
    metric: str
    mode: str
    scheduler: dict[str, Any]
    search: dict[str, Any]
    resources: dict[str, Any]
    max_concurrency: int = 0
    pack_size: int | str = "auto"
    fuse: bool = True
    max_failures: int = 1
    name: str = "sweep"
    preset: str | None = None
    """The reference preset beneath `config` (tune_configs/presets/NAME.yaml), already merged into it."""


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"sweep key '{key}': {msg}")


# ----- loading -------------------------------------------------------------------------------------------
def _read(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(source, dict):
        return plain(source), "sweep"
    path = Path(source)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read sweep file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sweep keys (algo, data, space, ...) at the top level")
    return raw, path.stem or "sweep"


def _apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, CliValue]:
    """Apply `--set key=value` strings to the sweep mapping in place. Returns the `config.` ones (dotted key
    under config -> raw text), which are parsed against their field's type once the algorithm is known."""
    config_sets: dict[str, CliValue] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. config.steps=500 or "
                              f"'space.algo.cql_alpha={{grid: [1, 2]}}'")
        key, text = (s.strip() for s in item.split("=", 1))
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: empty sweep key")
        value = CliValue(text)
        try:
            section = next((s for s in _WHOLE_KEY_SECTIONS if key.startswith(s)), None)
            if section is not None:  # space keys contain dots: everything after the section is one key
                target, path = raw, []
                for part in section[:-1].split("."):
                    path.append(part)
                    if target.get(part) is None:
                        target[part] = {}
                    if not isinstance(target[part], dict):
                        raise _err(".".join(path), f"expected a mapping, got {target[part]!r}")
                    target = target[part]
                target[key[len(section):]] = plain(value)  # replaces the whole entry
            elif key.startswith("config."):
                config_sets[key[len("config."):]] = value
            elif key in _STRING_KEYS:
                raw[key] = str(value)
            elif key in ("scheduler", "search"):  # a new scheduler or search replaces the old one's options
                raw[key] = plain(parse_overrides([item]))[key]
            else:
                merge(raw, plain(parse_overrides([item])))
        except ConfigError as e:
            raise ConfigError(f"--set {item!r}: {e}") from None
    return config_sets


def load_sweep(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> Sweep:
    """Read a sweep (a YAML path or a mapping), apply `--set key=value` overrides and validate everything."""
    raw, default_name = _read(source)
    config_sets = _apply_overrides(raw, overrides)
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise _err(unknown[0], f"unknown key; sweep keys: {', '.join(TOP_KEYS)} (run and algorithm settings "
                               f"go under config:, distributions under space:)")
    preset = raw.get("preset")
    if preset is not None:
        if not isinstance(preset, str) or not preset:
            raise _err("preset", f"expected a preset name (`rayoffline presets` lists them), got {preset!r}")
        from ..learner import presets
        base = plain(raw.get("config")) or {}
        if not isinstance(base, dict):
            raise _err("config", f"expected a mapping of run keys and algo: fields, got {raw.get('config')!r}")
        try:
            space, sched = raw.get("space"), raw.get("scheduler")
            mutations = sched.get("hyperparam_mutations") if isinstance(sched, dict) else None
            searched = [*(space if isinstance(space, dict) else ()), *(mutations if isinstance(mutations, dict) else ())]
            raw["config"], raw["algo"], raw["data"] = presets.apply(  # searched keys are the sweep's
                preset, raw.get("algo"), raw.get("data"), base, drop=searched, data_key="data:")
        except ConfigError as e:
            raise _err("preset", str(e)) from None
    algo = _string(raw, "algo", None)
    data = _string(raw, "data", None)
    try:
        cls = algorithms.get(algo)
    except ConfigError as e:
        raise _err("algo", str(e)) from None
    config, built = _config(algo, raw.get("config"), config_sets)
    fuse = _bool(raw, "fuse", True)
    space = _space(algo, cls, config, raw.get("space"))
    resources = _resources(raw.get("resources"), fuse)
    search = _search(raw.get("search"), space)
    metric = _string(raw, "metric", "eval/return_mean")
    mode = _string(raw, "mode", "max")
    if mode not in ("max", "min"):
        raise _err("mode", f"'max' or 'min', got {mode!r}")
    name = _string(raw, "name", default_name)
    if "/" in name or "\\" in name or name in (".", ".."):
        raise _err("name", f"the experiment's directory name: no path separators, got {name!r}")
    pack_size = raw.get("pack_size", "auto")
    if pack_size != "auto" and not (_is_int(pack_size) and pack_size >= 1):
        raise _err("pack_size", f"'auto' or an integer >= 1 (most members in one fused pack), got {pack_size!r}")
    max_failures = _int(raw, "max_failures", 1, -1)
    sweep = Sweep(algo=algo, data=data, config=config, space=space, seeds=_seeds(raw.get("seeds", 1)),
                  num_samples=_int(raw, "num_samples", 1, 1), metric=metric, mode=mode, scheduler={},
                  search=search, resources=resources, max_concurrency=_int(raw, "max_concurrency", 0, 0),
                  pack_size=pack_size, fuse=fuse, max_failures=max_failures, name=name, preset=preset)
    scheduler = _scheduler(sweep, built, raw.get("scheduler"))
    if scheduler["type"] == "pbt" and search["type"] == "optuna":
        raise _err("search.type", "scheduler pbt explores by itself and takes no search algorithm "
                                  "(Tune refuses both); use search type random")
    return dataclasses.replace(sweep, scheduler=scheduler)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _string(raw: dict[str, Any], key: str, default: str | None) -> str:
    if key not in raw or raw[key] is None:
        if default is None:
            raise _err(key, "missing; a sweep names its algorithm (algo:) and its dataset (data:)")
        return default
    value = raw[key]
    if not isinstance(value, str) or not value:
        raise _err(key, f"expected a non-empty string, got {value!r}")
    return value


def _bool(raw: dict[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise _err(key, f"expected true or false, got {value!r}")
    return value


def _int(raw: dict[str, Any], key: str, default: int, minimum: int) -> int:
    value = raw.get(key, default)
    if not _is_int(value) or value < minimum:
        extra = " (or -1: unlimited)" if key == "max_failures" else ""
        raise _err(key, f"expected an integer >= {max(minimum, 0)}{extra}, got {value!r}")
    return value


def _seeds(value: Any) -> list[int]:
    if _is_int(value) and value >= 1:
        return list(range(value))
    if (isinstance(value, list) and value and all(_is_int(s) and s >= 0 for s in value)
            and len(set(value)) == len(value)):
        return list(value)
    raise _err("seeds", f"a positive count n (seeds 0 .. n-1) or a non-empty list of distinct integers >= 0, "
                        f"got {value!r}")


def _config_error(e: ConfigError) -> ConfigError:
    return ConfigError(str(e).replace("config key '", "sweep key 'config.", 1))


def _config(algo: str, value: Any, config_sets: dict[str, CliValue]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fixed part of every trial's run config (plain data, `--set config.*` parsed), and its build."""
    config = value if value is not None else {}
    if not isinstance(config, dict):
        raise _err("config", f"expected a mapping of run keys and algo: fields (as in a train --config file), "
                             f"got {config!r}")
    view = merge(json.loads(json.dumps(config)), nest_dotted(dict(config_sets)))
    if "members" in view:
        raise _err("config.members", "a sweep builds members itself: seeds come from seeds:, per-member "
                                     "values from space: entries")
    if "seed" in view:
        raise _err("config.seed", "seeds come from the sweep's seeds: key (a count or a list); remove it")
    for key, where in _FROM_RESOURCES.items():
        if key in view:
            raise _err(f"config.{key}", f"a sweep places its trials itself; set {where} instead")
    try:
        built = build_config(algo, config, dict(config_sets) or None)
    except ConfigError as e:
        raise _config_error(e) from None
    for dotted, text in config_sets.items():
        merge(config, nest_dotted({dotted: _typed(built, dotted, text)}))
    return config, built


def _typed(built: dict[str, Any], dotted: str, text: CliValue) -> Any:
    """The value `--set config.KEY=TEXT` gave KEY, read back from the built config (so typed as its field)."""
    if dotted in RUN_KEYS:
        return to_dict(built["run"])[dotted]
    head, _, field = dotted.partition(".")
    algo_fields = to_dict(built["members"][0])
    if head == "algo" and field in algo_fields:
        return algo_fields[field]
    return plain(text)


def _algo_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls.Config) if f.init]


def member_keys(algo: str) -> set[str]:
    """The dotted keys that may differ within one fused pack: `algo.<field>` of the per-member fields."""
    return {f"algo.{f.name}" for f in _algo_fields(algorithms.get(algo)) if is_member_field(f)}


def _in_config(config: dict[str, Any], key: str) -> bool:
    if key in RUN_KEYS:
        return key in config
    return key.split(".", 1)[1] in (config.get("algo") or {})


def _space(algo: str, cls: type, config: dict[str, Any], value: Any) -> dict[str, dict[str, list[Any]]]:
    space = value if value is not None else {}
    if not isinstance(space, dict):
        raise _err("space", f"expected a mapping of dotted config keys to distributions, got {space!r}")
    algo_keys = [f"algo.{f.name}" for f in _algo_fields(cls)]
    out: dict[str, dict[str, list[Any]]] = {}
    for key, spec in space.items():
        where = f"space.{key}"
        if key in ("seed", "members"):
            raise _err(where, "seeds come from the sweep's seeds: key (a count or a list), members from the "
                              "space's per-member entries; remove it")
        if key in _FROM_RESOURCES:
            raise _err(where, f"a sweep places its trials itself; set {_FROM_RESOURCES[key]} instead")
        if key not in RUN_KEYS and key not in algo_keys:
            parent, _, last = str(key).rpartition(".")
            hint = (f" (to set the distribution from the command line: --set '{'space.' + parent}={{{last}: ...}}')"
                    if last in KINDS and parent else "")
            run_keys = sorted(RUN_KEYS - {"seed"} - set(_FROM_RESOURCES))
            raise _err(where, f"not a config key{hint}; run keys: {', '.join(run_keys)}; "
                              f"{algo} keys: {', '.join(algo_keys)}")
        if _in_config(config, key):
            raise _err(where, f"also set under config: (config.{key}); give it in one place")
        out[key] = _distribution(where, spec)
        _check_values(algo, config, key, out[key], where)
    return out


def _distribution(where: str, spec: Any) -> dict[str, list[Any]]:
    """Check one {kind: args} entry; returns it with args as a list."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _err(where, f"expected one distribution such as {{grid: [1, 2]}} or {{uniform: [0.1, 1]}} "
                          f"(kinds: {', '.join(KINDS)}), got {spec!r}")
    (kind, args), = spec.items()
    if kind not in KINDS:
        raise _err(where, f"unknown distribution {kind!r}; kinds: {', '.join(KINDS)}")
    if not isinstance(args, list):
        raise _err(where, f"{kind}: expected a list, got {args!r}")
    if kind in ("grid", "choice"):
        if not args:
            raise _err(where, f"{kind}: expected a non-empty list of values")
        return {kind: list(args)}
    quantized = kind.startswith("q")
    arity = 3 if quantized else 2
    form = "[lo, hi, q]" if quantized else "[lo, hi]"
    integer = kind.endswith("randint")
    ok = len(args) == arity and all(_is_int(a) if integer else _is_number(a) for a in args)
    if not ok:
        raise _err(where, f"{kind}: expected {form} of {'integers' if integer else 'numbers'}, got {args!r}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise _err(where, f"{kind}: needs lo < hi, got {args!r}")
    if "loguniform" in kind and lo <= 0:
        raise _err(where, f"{kind}: needs 0 < lo, got {args!r}")
    if quantized:
        q = args[2]
        if q <= 0:
            raise _err(where, f"{kind}: needs q > 0, got {args!r}")
        if math.floor(hi / q) < math.ceil(lo / q):
            raise _err(where, f"{kind}: no multiple of q={q} lies in [{lo}, {hi}]")
    return {kind: list(args)}


def _probes(kind: str, args: list[Any]) -> list[tuple[Any, str]]:
    """Values a distribution can produce that bound what it produces: (value, what it is)."""
    if kind in ("grid", "choice"):
        return [(v, "a listed value") for v in args]
    lo, hi = args[0], args[1]
    if kind in ("uniform", "loguniform"):
        inside = lo * (hi / lo) ** 0.382 if kind == "loguniform" else lo + 0.382 * (hi - lo)
        return [(lo, "its lower bound"), (hi, "its upper bound"), (inside, "a value inside the range")]
    if kind == "randint":
        return [(lo, "its lower bound"), (hi - 1, "its largest value (hi is excluded)")]
    q = args[2]
    first, last = math.ceil(lo / q) * q, math.floor(hi / q) * q  # Tune rounds the bounds inwards, exactly so
    if kind == "qrandint":
        return [(int(first), "its smallest value"), (int(last), "its largest value")]
    inside = round((lo + 0.382 * (hi - lo)) / q) * q
    return [(first, "its smallest value"), (last, "its largest value"), (inside, "a value inside the range")]


def _check_values(algo: str, config: dict[str, Any], key: str, dist: dict[str, list[Any]], where: str) -> None:
    (kind, args), = dist.items()
    for value, what in _probes(kind, args):
        try:
            build_config(algo, config, {key: value})
        except ConfigError as e:
            hint = "; use randint or qrandint for an integer field" if "expected an integer" in str(e) else ""
            raise _err(where, f"{kind} {args} gives {value!r} ({what}), which the field refuses: {e}{hint}") from None


def _resources(value: Any, fuse: bool) -> dict[str, Any]:
    res = value if value is not None else {}
    if not isinstance(res, dict):
        raise _err("resources", f"expected a mapping such as {{cpus: 1, gpus: 0}}, got {res!r}")
    unknown = sorted(set(res) - set(RESOURCE_KEYS))
    if unknown:
        raise _err(f"resources.{unknown[0]}", f"unknown resource; known: {', '.join(RESOURCE_KEYS)}")
    cpus, gpus, workers = res.get("cpus", 1), res.get("gpus", 0), res.get("workers", 0)
    if not _is_number(cpus) or cpus <= 0:
        raise _err("resources.cpus", f"expected a number > 0, got {cpus!r}")
    if not _is_number(gpus) or gpus < 0:
        raise _err("resources.gpus", f"expected a number >= 0 (a fraction shares a GPU), got {gpus!r}")
    if gpus > 1 and not float(gpus).is_integer():
        raise _err("resources.gpus", f"above 1 Ray takes whole GPUs only, got {gpus}")
    if not _is_int(workers) or workers < 0:
        raise _err("resources.workers", f"expected an integer >= 0 (Ray Train workers per trial), got {workers!r}")
    if workers and fuse:
        raise _err("resources.workers", "fused packs train on one device each; set fuse: false to give every "
                                        "configuration its own Ray Train worker group")
    return {"cpus": float(cpus), "gpus": float(gpus), "workers": workers}


def _kind_and_options(value: Any, name: str, default: str, options: dict[str, Any],
                      example: str) -> tuple[dict[str, Any], str]:
    """A `type:`-keyed option mapping (scheduler, search), or its type alone as a string: (the mapping, its type),
    the type and every option checked against `options` (type -> the option names it takes)."""
    mapping = {"type": value} if isinstance(value, str) else (value if value is not None else {"type": default})
    if not isinstance(mapping, dict):
        raise _err(name, f"expected a mapping such as {example}, got {mapping!r}")
    kind = mapping.get("type", default)
    if kind not in options:
        raise _err(f"{name}.type", f"{', '.join(options)}; got {kind!r}")
    unknown = sorted(set(mapping) - {"type", *options[kind]})
    if unknown:
        raise _err(f"{name}.{unknown[0]}", f"unknown option of {name} {kind}; options: "
                                           f"{', '.join(options[kind]) or 'none'}")
    return mapping, kind


def _search(value: Any, space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    search, kind = _kind_and_options(value, "search", "random", SEARCH_OPTIONS, "{type: random}")
    out: dict[str, Any] = {"type": kind}
    if kind == "grid":
        for key, dist in space.items():
            if "grid" not in dist:
                raise _err(f"space.{key}", f"search grid enumerates grid entries only, this is {next(iter(dist))}; "
                                           f"write {{grid: [...]}} or use search type random")
    if kind == "optuna":
        if not space:
            raise _err("space", "search optuna needs at least one space entry to suggest")
        for key, dist in space.items():
            if "grid" in dist:
                raise _err(f"space.{key}", "Optuna suggests values and cannot enumerate a grid; use choice")
        sampler = search.get("sampler", "tpe")
        if sampler not in ("tpe", "random"):
            raise _err("search.sampler", f"'tpe' or 'random', got {sampler!r}")
        seed = search.get("seed")
        if seed is not None and not (_is_int(seed) and seed >= 0):
            raise _err("search.seed", f"expected an integer >= 0, got {seed!r}")
        out.update(sampler=sampler, seed=seed)
    return out


def _candidates(sweep: Sweep, built: dict[str, Any], key: str) -> list[Any]:
    """The values a run key can take across the sweep (a range entry gives its bounds)."""
    if key in sweep.space:
        (kind, args), = sweep.space[key].items()
        return [v for v, _ in _probes(kind, args)]
    return [getattr(built["run"], key)]


def _scheduler(sweep: Sweep, built: dict[str, Any], value: Any) -> dict[str, Any]:
    sched, kind = _kind_and_options(value, "scheduler", "fifo", SCHEDULER_OPTIONS, "{type: asha, grace_period: 2000}")
    if kind == "fifo":
        return {"type": "fifo"}
    for key in ("log_every", "eval_every"):
        if key in sweep.space:
            raise _err(f"space.{key}", f"scheduler {kind} compares trials at the steps they report: fix {key} "
                                       f"under config:")
    run = built["run"]
    log_every, eval_every = run.log_every, run.eval_every
    if sweep.metric.startswith("eval/") and eval_every == 0:
        raise _err("config.eval_every", f"scheduler {kind} needs {sweep.metric} during training, but eval_every is "
                                        f"0 (evaluation only at the end); set it, e.g. to {5 * log_every}")
    steps = max(int(s) for s in _candidates(sweep, built, "steps"))

    def step_option(key: str, default: int | None) -> int:
        v = sched.get(key, default)
        if v is None:
            raise _err(f"scheduler.{key}", f"required by scheduler {kind} (steps, a multiple of log_every "
                                           f"{log_every})")
        if not _is_int(v) or v < 1:
            raise _err(f"scheduler.{key}", f"expected a number of steps >= 1, got {v!r}")
        if v % log_every and v != steps:
            near = max(1, round(v / log_every)) * log_every
            raise _err(f"scheduler.{key}", f"{v} is not a multiple of log_every {log_every} (Tune sees a result "
                                           f"every log_every steps); use e.g. {near}")
        return v

    def number(key: str, default: float, ok: Any, rule: str) -> float:
        v = sched.get(key, default)
        if not _is_number(v) or not ok(v):
            raise _err(f"scheduler.{key}", f"expected {rule}, got {v!r}")
        return float(v)

    if kind == "asha":
        first = log_every * math.ceil(eval_every / log_every) if sweep.metric.startswith("eval/") else log_every
        max_t = step_option("max_t", steps)
        grace = step_option("grace_period", first)
        if grace > max_t:
            raise _err("scheduler.grace_period", f"{grace} is beyond max_t {max_t}: no trial would ever stop early")
        brackets = sched.get("brackets", 1)
        if not _is_int(brackets) or brackets < 1:
            raise _err("scheduler.brackets", f"expected an integer >= 1, got {brackets!r}")
        return {"type": "asha", "grace_period": grace, "max_t": max_t, "brackets": brackets,
                "reduction_factor": number("reduction_factor", 4, lambda v: v > 1, "a number > 1")}

    interval = step_option("perturbation_interval", None)
    if interval >= steps:
        raise _err("scheduler.perturbation_interval", f"{interval} is not below steps {steps}: PBT would never "
                                                      f"perturb a trial")
    mutations = sched.get("hyperparam_mutations")
    if not isinstance(mutations, dict) or not mutations:
        raise _err("scheduler.hyperparam_mutations", "required by pbt: a mapping of space keys to a distribution "
                                                     "(as in space:) or a list of values")
    per_member = member_keys(sweep.algo)
    out_mutations: dict[str, Any] = {}
    for key, spec in mutations.items():
        where = f"scheduler.hyperparam_mutations.{key}"
        if key not in sweep.space:
            raise _err(where, f"not a space key; PBT mutates values the space samples first "
                              f"(space keys: {', '.join(sweep.space) or 'none'})")
        if sweep.fuse and key not in per_member:
            raise _err(where, f"not a per-member key: a PBT exploit continues the configuration in its own pack, "
                              f"where only per-member coefficients ({', '.join(sorted(per_member))}) can change; "
                              f"set fuse: false to mutate it")
        if isinstance(spec, list):
            if not spec:
                raise _err(where, "expected a non-empty list of values")
            dist = {"choice": list(spec)}
        else:
            dist = _distribution(where, spec)
            if "grid" in dist:
                raise _err(where, "PBT resamples values and cannot enumerate a grid; use choice or a list")
        _check_values(sweep.algo, sweep.config, key, dist, where)
        out_mutations[key] = list(spec) if isinstance(spec, list) else dist
    return {"type": "pbt", "perturbation_interval": interval, "hyperparam_mutations": out_mutations,
            "quantile_fraction": number("quantile_fraction", 0.25, lambda v: 0 < v <= 0.5, "a number in (0, 0.5]"),
            "resample_probability": number("resample_probability", 0.25, lambda v: 0 <= v <= 1,
                                           "a number in [0, 1]")}


# ----- trials --------------------------------------------------------------------------------------------
def _py(value: Any) -> Any:
    """Plain Python data (numpy scalars and tuples as Tune may hand them)."""
    if isinstance(value, dict):
        return {str(k): _py(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_py(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def pack_fields(sweep: Sweep, trial_config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(the trial's run config for build_config, its pack key). The pack key is a short hash of algo, data and
    every resolved value that is not per-member: configurations differing only in member keys share it."""
    config = json.loads(json.dumps(sweep.config))
    merge(config, nest_dotted({k: _py(v) for k, v in trial_config.items()}))
    built = build_config(sweep.algo, config)
    per_member = {k.split(".", 1)[1] for k in member_keys(sweep.algo)}
    shared = {"algo": sweep.algo, "data": sweep.data, "run": to_dict(built["run"]),
              "algo_config": {k: v for k, v in to_dict(built["members"][0]).items() if k not in per_member}}
    text = json.dumps(shared, sort_keys=True, separators=(",", ":"))
    return config, hashlib.sha1(text.encode()).hexdigest()[:12]


# ----- Ray Tune objects ----------------------------------------------------------------------------------
def _domain(dist: dict[str, list[Any]]) -> Any:
    from ray import tune

    (kind, args), = dist.items()
    if kind == "grid":
        return tune.grid_search(list(args))
    if kind == "choice":
        return tune.choice(list(args))
    return getattr(tune, kind)(*args)


def param_space(sweep: Sweep) -> dict[str, Any]:
    """Tune's param_space: flat dotted keys -> Tune domains (grid_search, choice, uniform, ...)."""
    return {key: _domain(dist) for key, dist in sweep.space.items()}


def make_scheduler(sweep: Sweep) -> Any:
    """FIFOScheduler, ASHAScheduler or PopulationBasedTraining on time_attr "step"; metric/mode come from
    TuneConfig."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = sweep.scheduler
    if s["type"] == "asha":
        return ASHAScheduler(time_attr="step", max_t=s["max_t"], grace_period=s["grace_period"],
                             reduction_factor=s["reduction_factor"], brackets=s["brackets"])
    if s["type"] == "pbt":
        mutations = {k: list(v) if isinstance(v, list) else _domain(v) for k, v in s["hyperparam_mutations"].items()}
        # PBT explores by scaling a value by 0.8 or 1.2, which can leave the mutation's range (an expectile of
        # 0.9 becomes 1.08): explored values are clipped back into it
        bounds = {k: (min(v[kind][:2]), max(v[kind][:2]) - (1 if kind == "randint" else 0))
                  for k, v in s["hyperparam_mutations"].items() if isinstance(v, dict)
                  for kind in v if kind not in ("grid", "choice")}
        return PopulationBasedTraining(time_attr="step", perturbation_interval=s["perturbation_interval"],
                                       hyperparam_mutations=mutations, quantile_fraction=s["quantile_fraction"],
                                       resample_probability=s["resample_probability"],
                                       custom_explore_fn=functools.partial(_clip_to_bounds, bounds))
    return FIFOScheduler()


def _clip_to_bounds(bounds: dict[str, tuple[float, float]], config: dict[str, Any]) -> dict[str, Any]:
    for key, (lo, hi) in bounds.items():
        if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool):
            config[key] = type(config[key])(min(max(config[key], lo), hi))
    return config


def make_search(sweep: Sweep) -> Any:
    """None for random and grid search (Tune's default variant generator), else an OptunaSearch whose metric,
    mode and space come from TuneConfig and param_space. The caller adds a ConcurrencyLimiter."""
    if sweep.search["type"] != "optuna":
        return None
    try:
        import optuna
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise _err("search.type", "optuna needs the optuna package: pip install 'optuna>=3.5'") from None
    seed = sweep.search.get("seed")
    sampler = (optuna.samplers.RandomSampler(seed=seed) if sweep.search.get("sampler") == "random"
               else optuna.samplers.TPESampler(seed=seed))
    return OptunaSearch(sampler=sampler)


# ----- checks against the data and the cluster -----------------------------------------------------------
def _reported(algo: str, config: dict[str, Any], meta: dict[str, Any], eval_on: bool) -> set[str]:
    """Metric names one trial with this run config reports: one update of a K=1 algorithm on 4 random rows."""
    import torch

    from ..batch import Batch
    from ..evaluation.rollout import normalized_score
    from ..spec import EnvSpec

    cfg = build_config(algo, config)
    spec = EnvSpec.from_metadata(meta)
    alg = algorithms.get(algo)(spec, cfg["members"][:1], [0], obs_mean=meta.get("obs_mean"),
                               obs_std=meta.get("obs_std"))
    from ..learner.shaping import reward_transform, schedules
    schedules(cfg["run"], algo, list(alg.optim_groups()))  # a schedule for a group the algorithm lacks
    reward_transform(cfg["run"].reward_scale, meta, str(meta.get("source")))  # return_range on equal returns
    g = torch.Generator().manual_seed(0)
    shape = (1, 4)
    if spec.discrete:
        actions = torch.randint(spec.action_dim, shape, generator=g)
    else:
        low, high = torch.tensor(spec.action_low), torch.tensor(spec.action_high)
        actions = low + (high - low) * torch.rand(*shape, spec.action_dim, generator=g)
    batch = Batch(observations=torch.randn(*shape, spec.obs_dim, generator=g), actions=actions,
                  rewards=torch.randn(*shape, generator=g),
                  next_observations=torch.randn(*shape, spec.obs_dim, generator=g),
                  terminations=torch.zeros(shape), truncations=torch.zeros(shape))
    names = {"step", "perf/updates_per_s", "perf/member_updates_per_s"}
    # a step on which every periodic group runs (e.g. TD3+BC's delayed actor)
    for group, _loss, metrics in alg.update(batch, int(getattr(alg, "step_period", 1))):
        names.add(f"loss/{group}")
        names.update(f"train/{m}" for m in metrics)
    if eval_on:
        names.update(("eval/return_mean", "eval/return_std"))
        if normalized_score(0.0, meta) is not None:
            names.add("eval/normalized_score")
    return names


def available_metrics(sweep: Sweep, meta: dict[str, Any]) -> tuple[set[str], dict[str, list[str]]]:
    """(the metric names every trial reports, {name: the configurations that lack it} for names only some
    report). Tried: config: with the first listed value of every grid, choice and PBT list entry, then each
    other listed value in turn (ranges keep the field's default: numbers do not change which metrics exist)."""
    listed: dict[str, list[Any]] = {}
    mutations = sweep.scheduler.get("hyperparam_mutations", {})
    for key in sorted(set(sweep.space) | set(mutations)):
        for entry in (sweep.space.get(key), mutations.get(key)):
            values = entry if isinstance(entry, list) else (entry or {}).get("grid", (entry or {}).get("choice", []))
            listed.setdefault(key, []).extend(_py(v) for v in values)
    base = {k: vals[0] for k, vals in listed.items() if vals}
    variants = [(", ".join(f"{k}={v!r}" for k, v in base.items()) or "config: as given", base)]
    variants += [(f"{k}={v!r}", {**base, k: v}) for k, vals in listed.items() for v in vals[1:]]
    cache: dict[str, set[str]] = {}
    reported: list[tuple[str, set[str]]] = []
    for label, values in variants:
        config = merge(json.loads(json.dumps(sweep.config)), nest_dotted(values))
        built = build_config(sweep.algo, config)
        if built["run"].init_from and sweep.fuse:
            raise _err("config.init_from", "a warm start is applied by unfused trials only (a pack builds its "
                                           "members from scratch); set fuse: false")
        eval_on = built["run"].eval_episodes > 0
        ident = json.dumps([to_dict(built["members"][0]), eval_on], sort_keys=True)
        if ident not in cache:
            cache[ident] = _reported(sweep.algo, config, meta, eval_on)
        reported.append((label, cache[ident] | {f"ope/{x}" for x in built["run"].ope}))  # fused or not
    every = set.intersection(*(names for _, names in reported))
    union = set.union(*(names for _, names in reported))
    return every, {n: [label for label, names in reported if n not in names] for n in union - every}


def check_metric(sweep: Sweep, meta: dict[str, Any]) -> None:
    """Refuse a metric that not every trial reports, listing the names that they do."""
    every, partial = available_metrics(sweep, meta)
    if sweep.metric in every:
        return
    listed = ", ".join(sorted(every))
    if sweep.metric in partial:
        without = ", ".join(partial[sweep.metric])
        raise _err("metric", f"{sweep.metric!r} is not reported by every trial (not with {without}); Tune needs "
                             f"it from all of them; reported by all: {listed}")
    hint = " (no eval/ metrics: config.eval_episodes is 0)" if not any(n.startswith("eval/") for n in every) else ""
    raise _err("metric", f"no trial reports {sweep.metric!r}{hint}; available: {listed}")


def check_resources(sweep: Sweep, cluster: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Refuse resources no node (or, with workers, the whole cluster) can ever provide. `cluster` and `nodes`
    are as ray.cluster_resources() and ray.nodes()[i]["Resources"] give them ("CPU", "GPU")."""
    cpus, gpus, workers = sweep.resources["cpus"], sweep.resources["gpus"], sweep.resources["workers"]
    nodes = nodes or [cluster]
    have = [(float(n.get("CPU", 0)), float(n.get("GPU", 0))) for n in nodes]
    unit = "per Ray Train worker" if workers else ("per pack" if sweep.fuse else "per trial")
    per_node = ", ".join(f"{c:g} CPUs/{g:g} GPUs" for c, g in have)
    if not any(c + _EPS >= cpus and g + _EPS >= gpus for c, g in have):
        if gpus > max(g for _, g in have) + _EPS:
            raise _err("resources.gpus", f"{gpus:g} GPUs {unit}, but no node has that many (nodes: {per_node}); "
                                         f"lower it (a fraction shares one GPU) or add a larger node")
        key, what = ("resources.cpus", f"{cpus:g} CPUs") if cpus > max(c for c, _ in have) + _EPS else (
            "resources.gpus", f"{cpus:g} CPUs and {gpus:g} GPUs together")
        raise _err(key, f"{what} {unit}, but no node has that much (nodes: {per_node}); lower it or add a "
                        f"larger node")
    if not workers:
        return
    total_cpus, total_gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if workers * gpus > total_gpus + _EPS:
        raise _err("resources.gpus", f"{workers} workers x {gpus:g} GPUs = {workers * gpus:g} GPUs per trial, but "
                                     f"the cluster has {total_gpus:g}; lower resources.workers or resources.gpus")
    if workers * cpus > total_cpus + _EPS:
        raise _err("resources.cpus", f"{workers} workers x {cpus:g} CPUs = {workers * cpus:g} CPUs per trial, but "
                                     f"the cluster has {total_cpus:g}; lower resources.workers or resources.cpus")
    slots = sum(min(math.floor(c / cpus + _EPS), math.floor(g / gpus + _EPS) if gpus else workers) for c, g in have)
    if slots < workers:
        raise _err("resources.workers", f"{workers} workers of {cpus:g} CPUs/{gpus:g} GPUs do not fit the nodes "
                                        f"({per_node}: room for {slots}); lower resources.workers")
