"""Standalone policy files: `rayoffline export RUN_DIR --format torchscript|onnx --out FILE [--member K]`.

A run's checkpoint holds K members' weights stacked along dim 0 and needs rayoffline to be rebuilt. Export turns
one member into a file that runs with torch alone (TorchScript) or with any ONNX runtime, rayoffline not installed:

    observations (B, obs_dim) float32, raw as in the dataset  ->  actions (B, act_dim) float32 in the environment's
                                                                   units (Box)  |  (B,) int64 indices (Discrete)

The graph computes exactly `Algorithm.act(obs)[member]` of the algorithm in eval mode:
    x = (obs - obs_mean) / obs_std                 when the run's config sets normalize_obs
    a = policy(x)                                  the algorithm's deterministic policy, member k's weights
    a = low + (a + 1) (high - low) / 2             continuous actions; discrete ones are already indices
with obs_mean/obs_std (the dataset's statistics, std clamped at 1e-3 as in training) and low/high as buffers.

What `policy` is, per algorithm: BC and TD3+BC their deterministic actor; IQL the mean tanh(mlp(s)) of its
Gaussian actor; CQL tanh(mu(s)) of its squashed Gaussian; discrete CQL argmax_a Q(s, a); discrete BCQ argmax of Q
over the actions its imitation network allows; BCQ decodes n_action_samples candidates from latents that were
drawn once per member at construction (buffer `act_latent`, saved in the checkpoint), perturbs them and takes the
one with the largest Q1. So no algorithm draws random numbers when acting: BCQ's latents are constants of the
exported graph (the very ones `act` uses), and the file returns what evaluation rollouts of that member took.

How: a K=1 algorithm of the same class is built with member k's config and seed and loaded with member k's slice
of every stacked state entry (rows k*E..(k+1)*E-1 of an entry stacked over K*E; the layout of
rayoffline.learner.pack_state.select); the submodules `policy` never reads (critics, value network, targets,
BCQ's VAE encoder) are dropped, found by recording which tensors `policy` touches on a probe batch. TorchScript
comes from torch.jit.trace (no policy has data-dependent Python control flow; batch sizes are traced as symbols),
ONNX from torch.onnx.export's dynamo exporter with a dynamic batch dimension, serialized in memory into a single
file (no external-data file). Before a file is written, the exported program is run at two batch sizes on probe
observations and compared with `algorithm.act` (the ONNX model through onnxruntime when it is installed).

The file carries its metadata (algo, member, seed, step, spaces, dataset and content hash, versions, input and
output names): TorchScript in `_extra_files["rayoffline.json"]`, ONNX as metadata_props (one key each, JSON
values; `rayoffline.json` holds the whole record). Files are written beside --out and renamed into place.

**Deviations and limits**
- The graph runs in float32, as `act` does (a `precision: bf16` run autocasts its training passes only; its
  weights are float32).
- Only the deterministic policy is exported: no critic values, no stochastic sampling (e.g. IQL's Gaussian noise).
- The self-check compares continuous actions to 1e-4 of the action range; discrete ones must be equal, except
  that one row per probe batch of the ONNX program may pick the other action of a near-tie of two Q-values
  (another runtime rounds differently). Without onnxruntime the ONNX file itself goes unchecked (the torch module
  it was exported from is checked).
- torch.jit.trace/save/load are deprecated in torch 2.13 in favour of torch.export, which cannot write TorchScript;
  their notices are silenced here.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .algorithms.base import Algorithm
from .errors import ConfigError
from .learner.checkpoint import json_safe, write_atomic

__all__ = ["export_policy", "read_metadata", "describe", "member_algorithm", "PolicyModule", "prune_unused",
           "trace_torchscript", "to_onnx", "FORMATS"]

FORMATS = ("torchscript", "onnx")
INPUT_NAME, OUTPUT_NAME = "observations", "actions"
METADATA_KEY = "rayoffline.json"
FORMAT_VERSION = 1
_TRACE_BATCH, _CHECK_BATCHES = 8, (1, 64)


class PolicyModule(nn.Module):
    """One member's deterministic policy on raw observations: (B, obs_dim) float32 -> actions in env units."""

    def __init__(self, algorithm: Algorithm) -> None:
        super().__init__()
        if algorithm.K != 1:
            raise ValueError(f"PolicyModule takes a K=1 algorithm, got K={algorithm.K}")
        self.algorithm = algorithm
        self.normalize = bool(algorithm.cfg.normalize_obs)
        self.discrete = bool(algorithm.spec.discrete)
        self.register_buffer("obs_mean", algorithm.obs_mean.detach().clone())
        self.register_buffer("obs_std", algorithm.obs_std.detach().clone())
        if not self.discrete:
            self.register_buffer("act_low", algorithm.act_low.detach().clone())
            self.register_buffer("act_high", algorithm.act_high.detach().clone())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        x = observations.to(torch.float32)                                   # (B, obs)
        if self.normalize:
            x = (x - self.obs_mean) / self.obs_std
        a = self.algorithm.policy(x.unsqueeze(0)).squeeze(0)                 # (B, act) in [-1, 1] | (B,) int64
        if self.discrete:
            return a
        return self.act_low + (a + 1.0) * 0.5 * (self.act_high - self.act_low)


def member_algorithm(algorithm: Algorithm, member: int) -> Algorithm:
    """A K=1 copy of `algorithm`'s member `member` (its config, seed and weights), in eval mode on the CPU."""
    k = algorithm.K
    if not 0 <= member < k:
        raise ConfigError(_bad_member(member, k))
    cls = type(algorithm)
    one = cls(algorithm.spec, [algorithm.configs[member]], [algorithm.seeds[member]], device="cpu",
              obs_mean=algorithm.obs_mean.cpu(), obs_std=algorithm.obs_std.cpu())
    state = {}
    for name, t in algorithm.state_dict().items():
        t = t.detach().cpu()
        if name in cls.SHARED_STATE:
            state[name] = t
        else:
            rows = t.shape[0] // k  # entries are stacked member-major over K (or K*E for E ensemble copies)
            state[name] = t[member * rows:(member + 1) * rows].clone()
    one.load_state_dict(state)
    one.float().eval().requires_grad_(False)
    return one


class _Touched(TorchFunctionMode):
    """Records the ids of every tensor that a torch function or tensor method receives."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in (*args, *kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, torch.Tensor):
                    self.ids.add(id(t))
        return func(*args, **kwargs)


def prune_unused(module: PolicyModule, probe: torch.Tensor) -> list[str]:
    """Drop the submodules of module.algorithm whose tensors `forward(probe)` never reads; returns their names."""
    with torch.no_grad(), _Touched() as rec:
        module(probe)
    dropped: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            tensors = [*child.parameters(), *child.buffers()]
            if not tensors:
                continue
            if not any(id(t) in rec.ids for t in tensors):
                if isinstance(parent, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
                    continue  # indexing a container by position must keep working
                delattr(parent, name)
                dropped.append(prefix + name)
            else:
                visit(child, f"{prefix}{name}.")

    visit(module.algorithm, "")
    return dropped


# ----- the export ---------------------------------------------------------------------------------------------
def export_policy(run_dir: str | Path, fmt: str, out: str | Path, member: int | None = None,
                  force: bool = False) -> dict[str, Any]:
    """Write member `member` (default: result.json's best_member, else 0) of the run in `run_dir` as a standalone
    policy file `out` in format `fmt` ('torchscript' or 'onnx'). Returns {"out", "format", "member",
    "member_from", "bytes", "dropped" (submodules left out), "max_abs_diff" (self-check), "checked_with",
    "metadata" (what the file carries)}."""
    from .learner.api import load_run

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; give a file path, e.g. {out / _default_name(fmt)}")
    if out.exists() and not force:
        raise ConfigError(f"--out {out}: file exists; pass --force to replace it, or choose another path")
    if fmt == "onnx":
        _require_onnx()
    algorithm, meta, state = load_run(run_dir, device="cpu")
    member, member_from = _choose_member(Path(run_dir), algorithm.K, member)
    one = member_algorithm(algorithm, member)
    module = PolicyModule(one).eval()
    probe = _probe(algorithm)
    dropped = prune_unused(module, probe)
    expected = algorithm.act(probe)[member]                               # (B, act) | (B,)
    _compare(lambda x: module(x), probe, expected, "the policy module", algorithm, exact_rows=0)

    metadata = _metadata(algorithm, meta, state, member, fmt)
    if fmt == "torchscript":
        program = trace_torchscript(module, probe[:_TRACE_BATCH])
        run, checked_with = program, "torch.jit"
    else:
        program = to_onnx(module, probe[:_TRACE_BATCH], metadata)
        run, checked_with = _onnx_runner(program)
    diff = _compare(run, probe, expected, f"the exported {fmt} program", algorithm,
                    exact_rows=1 if fmt == "onnx" else 0) if run is not None else None

    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        text = json.dumps(metadata, indent=2, allow_nan=False)
        with _quiet():
            write_atomic(out, "wb", lambda f: torch.jit.save(program, f, _extra_files={METADATA_KEY: text}))
    else:
        data = program.SerializeToString()
        write_atomic(out, "wb", lambda f: f.write(data))
    return {"out": str(out), "format": fmt, "member": member, "member_from": member_from,
            "bytes": out.stat().st_size, "dropped": dropped, "max_abs_diff": diff,
            "checked_with": checked_with, "metadata": metadata}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata record of an exported policy file (TorchScript or ONNX)."""
    path = Path(path)
    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"  # TorchScript files are zip archives, ONNX files protobuf messages
    if not zipped:
        onnx = _require_onnx()
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        if METADATA_KEY not in props:
            raise ConfigError(f"{path}: an ONNX model without rayoffline metadata (not written by rayoffline export)")
        return json.loads(props[METADATA_KEY])
    extra = {METADATA_KEY: ""}
    with _quiet():
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[METADATA_KEY]:
        raise ConfigError(f"{path}: a TorchScript file without rayoffline metadata (not written by rayoffline export)")
    return json.loads(extra[METADATA_KEY])


def describe(result: dict[str, Any]) -> str:
    """The CLI's one-line summary of an export."""
    m = result["metadata"]
    inp, outp = m["input"], m["output"]
    shape = lambda s: "(" + ", ".join(str(d) for d in s) + ")"  # noqa: E731
    if m["action_space"].get("type") == "Box":
        lo, hi = m["action_space"]["low"], m["action_space"]["high"]
        same = len(set(map(str, lo))) == 1 and len(set(map(str, hi))) == 1
        units = f" in [{_num(lo[0])}, {_num(hi[0])}]" if same else " within the action space's bounds"
    else:
        units = f" in 0..{m['action_space']['n'] - 1}"
    return (f"wrote {result['out']} ({result['format']}, {result['bytes'] / 1024:.1f} KiB): {m['algo']} member "
            f"{m['member']} ({result['member_from']}, seed {m['seed']}, step {m['step']}); {inp['name']} "
            f"{shape(inp['shape'])} {inp['dtype']} -> {outp['name']} {shape(outp['shape'])} {outp['dtype']}{units}")


# ----- helpers ------------------------------------------------------------------------------------------------
def _default_name(fmt: str) -> str:
    return "policy.onnx" if fmt == "onnx" else "policy.pt"


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _require_onnx():
    """The onnx module, or a ConfigError naming the missing packages and the extra that installs them."""
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"--format onnx needs the packages onnx and onnxscript (not installed: "
                          f"{', '.join(missing)}); install them with pip install 'rayoffline[export]'")
    import onnx
    return onnx


def _choose_member(run_dir: Path, k: int, member: int | None) -> tuple[int, str]:
    """The member to export and where the choice came from: --member, result.json's best_member, or 0."""
    if member is None and k == 1:
        return 0, "the only member"
    if member is not None:
        if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < k:
            raise ConfigError(_bad_member(member, k))
        return member, "--member"
    try:
        best = json.loads((run_dir / "result.json").read_text()).get("best_member")
    except (OSError, ValueError, AttributeError):
        best = None
    if isinstance(best, int) and not isinstance(best, bool) and 0 <= best < k:
        return best, "best member in result.json"
    return 0, "default: no best member in result.json"


def _bad_member(member: Any, k: int) -> str:
    valid = "the only index is 0" if k == 1 else f"valid indices are 0..{k - 1}"
    return f"--member {member}: the run has {k} member{'s' if k > 1 else ''}, {valid}"


def _probe(algorithm: Algorithm, rows: int = max(_CHECK_BATCHES)) -> torch.Tensor:
    """Fixed probe observations spread like the dataset's (mean +- 2 std): (rows, obs) float32."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(rows, algorithm.spec.obs_dim, generator=g)
    return (algorithm.obs_mean.cpu() + 2.0 * algorithm.obs_std.cpu() * z).float()


def _compare(run: Callable[[torch.Tensor], Any], probe: torch.Tensor, expected: torch.Tensor, what: str,
             algorithm: Algorithm, exact_rows: int) -> float:
    """Check `run` against Algorithm.act at each of _CHECK_BATCHES batch sizes; returns the max |difference|.

    Continuous: |diff| <= 1e-4 * max(1, high - low). Discrete: equal indices, except at most `exact_rows` rows
    per batch (another runtime's rounding may break a near-tie of two Q-values the other way)."""
    worst = 0.0
    for b in _CHECK_BATCHES:
        with torch.no_grad():
            got = torch.as_tensor(run(probe[:b]))
        want = expected[:b]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise RuntimeError(f"{what} of '{algorithm.name}' returns {tuple(got.shape)} {got.dtype} for {b} "
                               f"observations where Algorithm.act gives {tuple(want.shape)} {want.dtype}; this is a "
                               f"bug in rayoffline's export, please report it")
        if algorithm.spec.discrete:
            bad = int((got != want).sum())
            ok = bad <= exact_rows
            worst = max(worst, float((got - want).abs().max()) if b else 0.0)
            detail = f"{bad} of {b} actions differ"
        else:
            d = float((got - want).abs().max())
            scale = float((algorithm.act_high - algorithm.act_low).abs().max().clamp_min(1.0))
            ok = d <= 1e-4 * scale
            worst = max(worst, d)
            detail = f"max |difference| {d:.3g}"
        if not ok:
            raise RuntimeError(f"{what} of '{algorithm.name}' disagrees with Algorithm.act at batch size {b} "
                               f"({detail}); this is a bug in rayoffline's export, please report it")
    return worst


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' deprecation notices and log lines (torch.jit's trace/save/load are deprecated in
    favour of torch.export, which cannot write TorchScript; the ONNX exporter logs optional ops it skips)."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        log.setLevel(level)


def trace_torchscript(module: PolicyModule, example: torch.Tensor) -> torch.jit.ScriptModule:
    """module traced into TorchScript on example observations (B, obs); the batch size stays symbolic."""
    with torch.no_grad(), _quiet():
        return torch.jit.trace(module, (example,), check_trace=False)


def to_onnx(module: PolicyModule, example: torch.Tensor, metadata: dict[str, Any]):
    """module as an onnx.ModelProto with a dynamic batch dimension, carrying `metadata` (metadata_props: one key
    per entry, non-strings as JSON, and METADATA_KEY the whole record); adds metadata["onnx_opset"]."""
    batch = torch.export.Dim("batch")
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(module, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"observations": {0: batch}}, dynamo=True, verbose=False)
    model = program.model_proto
    metadata["onnx_opset"] = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    model.doc_string = (f"rayoffline {metadata.get('algo')} policy, member {metadata.get('member')}: raw "
                        f"observations -> actions in the environment's units")
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value, allow_nan=False)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, allow_nan=False)
    return model


def _onnx_runner(model) -> tuple[Callable[[torch.Tensor], Any] | None, str]:
    """An onnxruntime session running `model` on a tensor, and what checks the export (None: no onnxruntime)."""
    try:
        import onnxruntime
    except ImportError:
        return None, "the torch module (onnxruntime not installed)"
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return (lambda x: session.run(None, {INPUT_NAME: x.numpy()})[0]), "onnxruntime"


def _metadata(algorithm: Algorithm, meta: dict[str, Any], state: dict[str, Any], member: int,
              fmt: str) -> dict[str, Any]:
    from . import __version__
    from .config import to_dict
    spec = algorithm.spec
    act_shape: list[Any] = ["batch"] if spec.discrete else ["batch", spec.action_dim]
    record = {
        "producer": "rayoffline export", "format_version": FORMAT_VERSION, "format": fmt,
        "algo": algorithm.name, "member": member, "members": algorithm.K, "seed": int(algorithm.seeds[member]),
        "step": int(state["step"]), "config": to_dict(algorithm.configs[member]),
        "observation_space": meta.get("observation_space"), "action_space": meta.get("action_space"),
        "env_id": meta.get("env_id"), "dataset": meta.get("source"), "dataset_content_hash": meta.get("content_hash"),
        "normalize_obs": bool(algorithm.cfg.normalize_obs),
        "input": {"name": INPUT_NAME, "shape": ["batch", spec.obs_dim], "dtype": "float32",
                  "meaning": "raw observations as in the dataset, flattened (normalization is inside the graph)"},
        "output": {"name": OUTPUT_NAME, "shape": act_shape, "dtype": "int64" if spec.discrete else "float32",
                   "meaning": ("greedy action indices" if spec.discrete else
                               "deterministic actions in the environment's units")},
        "rayoffline_version": __version__, "torch_version": torch.__version__,
    }
    return json_safe(record)
