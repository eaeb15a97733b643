"""cluster/: the `ray up` YAML against Ray's own schema, the KubeRay manifests (ray.io/v1 RayCluster and RayJob,
GPU worker groups, RayJob lifecycle fields, shared volumes under run directories, workers that fit their cluster),
and every `rayoffline ...` command line in cluster/ parsed by the CLI's own parser. No cluster, no kubectl."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from rayoffline.cli import build_parser

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAY_UP = CLUSTER / "ray-cluster.yaml"
README = CLUSTER / "README.md"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


SUBCOMMANDS = sorted(_subcommands(build_parser()))
# a mention of a command in raw text: `rayoffline` as a word, followed by one of the CLI's subcommands
MENTION = re.compile(rf"(?<![\w./-])rayoffline\s+(?:{'|'.join(SUBCOMMANDS)})\b")
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", "--"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _commands_in(code: str) -> list[list[str]]:
    """argv of every `rayoffline ...` command in a piece of shell code: backslash-newline continuations joined,
    commands found at the start of a line or after &&, ||, ;, |, & or ( and after `--` (as in
    `ray job submit ... -- rayoffline train ...`), leading VAR=value assignments skipped. A lone word `rayoffline`
    (a name in YAML: cluster_name, metadata.name) is not a command."""
    found = []
    for line in code.replace("\\\n", " ").splitlines():
        if "rayoffline" not in line:
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        segment: list[str] = []
        for token in [*lexer, ";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            while segment and ENV_ASSIGNMENT.match(segment[0]):
                segment.pop(0)
            if len(segment) > 1 and segment[0] == "rayoffline":
                found.append(segment)
            segment = []
    return found


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _code_chunks(path: Path) -> list[str]:
    """The pieces of `path` that hold shell code: Markdown fenced blocks and inline code spans; YAML string values
    and code spans in comments; any other file whole."""
    text = path.read_text()
    if path.suffix == ".md":
        fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
        prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
        spans = re.findall(r"`([^`\n]+)`", prose)
        # a span that only names a command (`rayoffline train`) is prose, not a command line
        spans = [s for s in spans if not re.fullmatch(rf"rayoffline (?:{'|'.join(SUBCOMMANDS)})", s.strip())]
        return fenced + spans
    if path.suffix in (".yaml", ".yml"):
        values = [s for doc in yaml.safe_load_all(text) for s in _strings(doc)]
        comments = [m.group(1) for line in text.splitlines() if (m := re.search(r"(?:^|\s)#(.*)$", line))]
        spans = [s for c in comments for s in re.findall(r"`([^`]+)`", c)]
        spans = [s for s in spans if not re.fullmatch(rf"rayoffline (?:{'|'.join(SUBCOMMANDS)})", s.strip())]
        return values + spans
    return [text]


def _cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file())


def _collect() -> list[tuple[str, list[str]]]:
    out = []
    for path in _cluster_files():
        n = 0
        for chunk in _code_chunks(path):
            for argv in _commands_in(chunk):
                n += 1
                out.append((f"{path.relative_to(CLUSTER)}#{n}", argv))
    return out


COMMANDS = _collect()


def _parse(argv: list[str]) -> argparse.Namespace:
    """The CLI's own parse of `rayoffline ARGS`; fails the test with argparse's message instead of exiting."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"`{shlex.join(argv)}` does not parse (exit {e.code}): {err.getvalue().strip()}")


def _leaf_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, str]:
    """The (sub)parser that reads argv's options, and its command (`rayoffline data convert`)."""
    parser, depth = build_parser(), 1
    for token in argv[1:]:
        sub = _subcommands(parser)
        if token not in sub:
            break
        parser, depth = sub[token], depth + 1
    return parser, " ".join(argv[:depth])


def _train_commands() -> list[tuple[str, argparse.Namespace]]:
    return [(where, _parse(argv)) for where, argv in COMMANDS if argv[1:2] == ["train"]]


# ---------------------------------------------------------------- every command line parses
@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_command_parses_with_the_cli_parser(where, argv):
    ns = _parse(argv)
    assert ns.command == argv[1]
    # argparse accepts unambiguous prefixes (--num-work); a command line in the docs spells flags in full
    parser, command = _leaf_parser(argv)
    for token in argv[2:]:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in parser._option_string_actions, f"{where}: `{flag}` is not a flag of `{command}`"


def test_commands_were_found_everywhere_they_are_written():
    assert len(COMMANDS) >= 3, COMMANDS
    # extraction finds exactly the commands the text mentions, chunk by chunk (so it cannot silently miss any)
    for path in _cluster_files():
        for chunk in _code_chunks(path):
            assert len(MENTION.findall(chunk)) == len(_commands_in(chunk)), (path, chunk)
    where = {w.split("#")[0] for w, _ in COMMANDS}
    assert {"README.md", "kuberay/rayjob.yaml", "kuberay/rayjob-shared.yaml"} <= where, where
    assert sum(w.startswith("README.md#") for w, _ in COMMANDS) >= 3


def test_extraction_handles_continuations_separators_and_env():
    code = ("ray job submit --address http://h:8265 -- \\\n  rayoffline train --out r \\\n  --steps 5 # note\n"
            "cd x && RAY_ADDRESS=auto rayoffline eval r; pip install rayoffline\n")
    assert _commands_in(code) == [["rayoffline", "train", "--out", "r", "--steps", "5"],
                                  ["rayoffline", "eval", "r"]]


# ---------------------------------------------------------------- ray up
def _ray_up() -> dict:
    (config,) = yaml.safe_load_all(RAY_UP.read_text())
    return config


def test_ray_up_yaml_validates_against_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    schema_path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    jsonschema.validate(_ray_up(), json.loads(schema_path.read_text()))


def test_ray_up_yaml_passes_rays_own_checks():
    """What `ray up` does first: merge the provider's defaults, then validate (head type, min/max workers)."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    if not all(hasattr(util, f) for f in ("prepare_config", "validate_config")):
        pytest.skip("this Ray has no prepare_config/validate_config")
    try:
        prepared = util.prepare_config(_ray_up())
    except ImportError as e:  # a provider's defaults that need its SDK (boto3) to load
        pytest.skip(f"cannot prepare the config here: {e}")
    util.validate_config(prepared)


def test_ray_up_has_gpu_workers_for_the_runs_and_installs_torch_cuda_and_rayoffline():
    config = _ray_up()
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    gpus_kept = sum(t.get("min_workers", 0) * t["resources"].get("GPU", 0) for t in workers)
    per_node = max(t["resources"].get("GPU", 0) for t in workers)
    assert per_node >= 1, "no GPU worker node type"
    for where, ns in _train_commands():  # rayoffline refuses a run the cluster's current GPUs cannot place
        if where.startswith("README.md") and ns.num_workers:
            assert ns.num_workers * (ns.gpus_per_worker or 0) <= gpus_kept, where
            assert (ns.gpus_per_worker or 0) <= per_node, where
    setup = config["setup_commands"]
    assert any("torch==2.13.0" in c and "download.pytorch.org/whl/cu128" in c for c in setup), setup
    assert any(re.search(r"pip install .*rayoffline", c) for c in setup), setup


# ---------------------------------------------------------------- KubeRay
def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _ray_docs(kind: str | None = None) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _kuberay_docs()
            if str(d.get("apiVersion", "")).startswith("ray.io") and (kind is None or d["kind"] == kind)]


def _ray_cluster(name: str) -> dict:
    found = [d["spec"] for _, d in _ray_docs("RayCluster") if d["metadata"]["name"] == name]
    assert len(found) == 1, f"no RayCluster named {name!r} under cluster/kuberay"
    return found[0]


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"{p.name}:{d['metadata']['name']}", d["spec"]) for p, d in _ray_docs("RayCluster")]
    specs += [(f"{p.name}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"])
              for p, d in _ray_docs("RayJob") if "rayClusterSpec" in d["spec"]]
    return specs


def _quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _group_gpus(group: dict) -> float:
    return sum(_quantity(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in _containers(group))


def _group_cpus(group: dict) -> float:
    return sum(_quantity(c.get("resources", {}).get("limits", {}).get("cpu", 0)) for c in _containers(group))


def test_kuberay_manifests_are_ray_io_v1_clusters_and_jobs():
    assert {p.name for p, _ in _ray_docs("RayCluster")} >= {"raycluster.yaml"}
    assert {p.name for p, _ in _ray_docs("RayJob")} >= {"rayjob.yaml", "rayjob-shared.yaml"}
    for path, doc in _kuberay_docs():
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path
        if doc["kind"] in ("RayCluster", "RayJob") or str(doc["apiVersion"]).startswith("ray.io"):
            assert doc["apiVersion"] == "ray.io/v1", (path, doc["apiVersion"])
            assert doc["kind"] in ("RayCluster", "RayJob"), (path, doc["kind"])
            # KubeRay: names are DNS-1035 labels; a RayJob's cluster is named after it plus a suffix
            assert re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", doc["metadata"]["name"]), path


def test_kuberay_clusters_have_a_cpu_head_and_gpu_workers():
    specs = _cluster_specs()
    assert specs
    for where, spec in specs:
        head = spec["headGroupSpec"]
        assert _containers(head) and _group_gpus(head) == 0, where
        groups = spec["workerGroupSpecs"]
        assert any(_group_gpus(g) >= 1 for g in groups), f"{where}: no worker group requests nvidia.com/gpu"
        for group in [head, *groups]:
            assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), where
            for c in _containers(group):
                assert c.get("image"), where
                requests = c.get("resources", {}).get("requests", {})
                if "nvidia.com/gpu" in requests:  # an extended resource: requests, if given, equal limits
                    assert requests["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"], where
        for g in groups:
            assert g.get("groupName"), where
            assert g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 1 << 30), where


def test_rayjobs_lifecycle_fields():
    for path, job in _ray_docs("RayJob"):
        spec = job["spec"]
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), \
            f"{path}: needs exactly one of rayClusterSpec and clusterSelector"
        if "clusterSelector" in spec:
            _ray_cluster(spec["clusterSelector"]["ray.io/cluster"])
            # KubeRay never deletes a selected cluster; a TTL needs shutdownAfterJobFinishes
            assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec, path
        else:
            assert spec.get("shutdownAfterJobFinishes") is True, f"{path}: its own cluster should go when the job ends"
        if spec.get("ttlSecondsAfterFinished", 0):
            assert spec.get("shutdownAfterJobFinishes") is True and spec["ttlSecondsAfterFinished"] > 0, path
        assert len(_commands_in(spec["entrypoint"])) == 1, f"{path}: entrypoint is not one rayoffline command"


def _shared_mounts(spec: dict) -> set[str]:
    """Mount paths of a PersistentVolumeClaim that the head and every worker group mount at the same path."""
    def mounts(group):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in group["template"]["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
        return {(m["mountPath"].rstrip("/"), claims[m["name"]])
                for c in _containers(group) for m in c.get("volumeMounts", []) if m["name"] in claims}
    common = mounts(spec["headGroupSpec"])
    for g in spec["workerGroupSpecs"]:
        common &= mounts(g)
    return {path for path, _ in common}


def _is_local(path: str | None) -> bool:
    return bool(path) and "://" not in path and not path.startswith(("builtin:", "minari:"))


def test_rayjob_runs_fit_their_cluster_and_keep_runs_on_shared_storage():
    for path, job in _ray_docs("RayJob"):
        spec = job["spec"]
        cluster = spec.get("rayClusterSpec") or _ray_cluster(spec["clusterSelector"]["ray.io/cluster"])
        (argv,) = _commands_in(spec["entrypoint"])
        ns = _parse(argv)
        assert ns.command == "train" and ns.num_workers, path
        groups = cluster["workerGroupSpecs"]
        gpus = sum(g.get("replicas", 0) * _group_gpus(g) for g in groups)
        cpus = sum(g.get("replicas", 0) * _group_cpus(g) for g in groups)
        assert ns.num_workers * (ns.gpus_per_worker or 0) <= gpus, f"{path}: asks for more GPUs than the cluster has"
        assert (ns.gpus_per_worker or 0) <= max(_group_gpus(g) for g in groups), path
        assert ns.num_workers * (ns.cpus_per_worker or 1) < cpus, f"{path}: leaves no CPU for Ray Data"
        shared = _shared_mounts(cluster)
        for value in (ns.out, ns.data):
            if _is_local(value):
                assert any(value.startswith(m + "/") for m in shared), \
                    f"{path}: {value} is not on a volume mounted at the same path on the head and every worker"


def test_readme_runs_use_shared_storage_of_the_manifests():
    shared = {m for _, spec in _cluster_specs() for m in _shared_mounts(spec)}
    for option in _ray_up()["docker"].get("run_options", []):  # `ray up`: host volumes bound into every container
        if m := re.fullmatch(r"(?:-v|--volume)[ =](/[^:]+):(/[^:]+)(?::\w+)?", option):
            shared.add(m.group(2).rstrip("/"))
    assert shared
    for where, ns in _train_commands():
        if ns.num_workers:
            for value in (ns.out, ns.data):
                if _is_local(value) and not value.isupper():  # RUN_DIR-style placeholders are fine
                    assert any(value.startswith(m + "/") for m in shared), f"{where}: {value} not on {sorted(shared)}"


def test_ray_and_torch_versions_agree_across_manifests():
    tags = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", (CLUSTER / "Dockerfile").read_text()))
    tags |= set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", RAY_UP.read_text()))
    tags |= {str(spec["rayVersion"]) for _, spec in _cluster_specs()}
    assert len(tags) == 1, tags
    torch = set(re.findall(r"torch==([\w.+]+)", (CLUSTER / "Dockerfile").read_text() + RAY_UP.read_text()))
    assert len(torch) == 1, torch
