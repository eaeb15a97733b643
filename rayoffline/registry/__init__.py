"""The model registry (store.py): versioned models with their config, data, metrics, lineage and job, aliases
moved by compare-and-swap, and decision records. `rayoffline registry --help` on the command line.

    from rayoffline.registry import Registry
    reg = Registry.open("s3://bucket/models", create=True)
    v = reg.register("runs/iql", metrics={"note": "nightly"})
    reg.promote("production", v.version, expected=reg.alias("production"))

Names load on first use, so the CLI's parser can import `rayoffline.registry.commands` without the data layer.
"""
import importlib as _importlib

_NAMES = ("CURRENT", "AliasConflict", "AliasEntry", "Registry", "RegistryError", "UnknownAlias", "UnknownVersion",
          "VersionInfo", "parse_version", "version_id")

__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(_importlib.import_module("rayoffline.registry.store"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rayoffline.registry' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) - {"_importlib", "_NAMES"} | set(_NAMES))
