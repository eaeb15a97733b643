"""Checkpoints: written atomically (temporary file in the same directory, then os.replace) and loaded with
`torch.load(weights_only=True)`, so a checkpoint can never run code. One file per saved step:
RUN_DIR/checkpoints/step_00001000.pt holding networks, optimizers, RNG states, step, configs and the
dataset metadata.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int = 3) -> Path:
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{step:08d}.pt"
    write_atomic(path, "wb", lambda f: torch.save({"format_version": FORMAT_VERSION, "step": step, **payload}, f))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def publish(tmp: str | Path, path: Path) -> None:
    """Rename a finished temporary file into place with the mode a plain open() would have given it
    (mkstemp creates 0600, which hides run files from the rest of a team on shared storage)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name)), key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(run_dir: str | Path) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{checkpoint_dir(run_dir)}: no checkpoint found (expected step_*.pt); "
                              f"is {run_dir} a rayoffline run directory?")
    return found[-1]


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: corrupted or not a rayoffline checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a rayoffline checkpoint of format {FORMAT_VERSION}")
    for key in ("step", "algo", "learner", "member_configs", "seeds", "run_config"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}' (truncated or written by another tool)")
    return state


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half of one."""
    write_atomic(path, "w", lambda f: f.write(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    """`obj` as strict JSON (atomic, as atomic_write_text): non-finite floats, e.g. an unbounded clip_diff_max
    in a config, become the strings "inf", "-inf" and "nan", which JSON parsers outside Python accept."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def json_safe(obj: Any) -> Any:
    """JSON-safe: non-finite floats (e.g. an unbounded config value) as the strings 'inf', '-inf', 'nan'."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_atomic(path: Path, mode: str, write) -> None:
    """write(f) into a temporary file beside `path`, fsync, then publish it under `path` (atomic rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
