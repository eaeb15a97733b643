"""cluster/: the `ray up` YAML against Ray's own schema, the KubeRay manifests (ray.io/v1 RayCluster and RayJob,
GPU worker groups, RayJob lifecycle fields, shared volumes under run directories, workers that fit their cluster),
and every `rayoffline ...` command line in cluster/ and in the README's "Retraining jobs" section parsed by the CLI's
own parser (`ray job submit` lines by Ray's own CLI).

Scheduled retraining: the batch/v1 CronJob (Forbid, deadlines, retries) submits to the RayCluster's head service
a job file it ships from a ConfigMap, whose job loads with `load_job` and keeps its paths on the volume every Ray
pod mounts; the crontab likewise (flock -n); the example job file loads. The CronJob's container script runs
against a fake `ray` CLI and job SDK that behave as Ray 2.60's do (checked by hand against a real job server):
it fails unless the Ray job SUCCEEDED, refuses while an earlier run's Ray job still runs, follows its own after
a pod retry, and stops its Ray job when the pod is terminated. No cluster, no kubectl, no training."""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import importlib.util
import io
import json
import os
import re
import shlex
import time
import urllib.parse
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
# a redirection after whitespace, with its target: `>> log`, `2>&1`, `> /dev/null`, `&> out`, `< in`
REDIRECTION = re.compile(r"(?:(?<=\s)|^)\d*(?:&>>?|>>?&?|<)\s*[^\s;&|()<>]+")
REPO = CLUSTER.parent
TOP_README = REPO / "README.md"
RETRAIN_SECTION = "## Retraining jobs"


def _shell_lines(code: str) -> list[str]:
    """The logical lines of shell code: backslash-newline continuations joined, redirections dropped."""
    return [REDIRECTION.sub(" ", line) for line in code.replace("\\\n", " ").splitlines()]


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _commands_in(code: str) -> list[list[str]]:
    """argv of every `rayoffline ...` command in a piece of shell code: backslash-newline continuations joined,
    commands found at the start of a line or after &&, ||, ;, |, & or ( and after `--` (as in
    `ray job submit ... -- rayoffline train ...`), leading VAR=value assignments and redirections (`>> log 2>&1`)
    skipped. A lone word `rayoffline` (a name in YAML: cluster_name, metadata.name) is not a command."""
    found = []
    for line in _shell_lines(code):
        if "rayoffline" not in line:
            continue
        segment: list[str] = []
        for token in [*_tokens(line), ";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            while segment and ENV_ASSIGNMENT.match(segment[0]):
                segment.pop(0)
            if len(segment) > 1 and segment[0] == "rayoffline":
                found.append(segment)
            segment = []
    return found


def _ray_job_submits(code: str) -> list[tuple[list[str], list[str]]]:
    """(options, entrypoint argv) of every `ray job submit OPTIONS -- ENTRYPOINT` in shell code; a mention without
    `--` (prose: `ray job submit` runs ...) is not a command."""
    found = []
    for line in _shell_lines(code):
        if "ray job submit" not in line:
            continue
        tokens = _tokens(line)
        for i in range(len(tokens) - 2):
            rest = tokens[i + 3:]
            if tokens[i:i + 3] == ["ray", "job", "submit"] and "--" in rest:
                cut = rest.index("--")
                entry = []
                for token in rest[cut + 1:]:
                    if token in SEPARATORS - {"--"}:
                        break
                    entry.append(token)
                found.append((rest[:cut], entry))
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


def _python_strings(code: str) -> list[str]:
    """The string constants of a Python snippet (where a command line sits in Python: `entrypoint="..."`)."""
    return [n.value for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _not_a_bare_name(spans: list[str]) -> list[str]:
    # a span that only names a command (`rayoffline train`) is prose, not a command line
    return [s for s in spans if not re.fullmatch(rf"rayoffline (?:{'|'.join(SUBCOMMANDS)})", s.strip())]


def _code_chunks(path: Path, text: str | None = None) -> list[str]:
    """The pieces of `path` (or of `text`, read as that kind of file) that hold shell code: Markdown fenced blocks
    (a Python block: its string constants) and inline code spans; YAML string values and code spans in comments;
    any other file whole."""
    text = path.read_text() if text is None else text
    if path.suffix == ".md":
        fenced = []
        for lang, block in re.findall(r"^```([^\n]*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
            fenced += _python_strings(block) if lang.strip() == "python" else [block]
        prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
        return fenced + _not_a_bare_name(re.findall(r"`([^`\n]+)`", prose))
    if path.suffix in (".yaml", ".yml"):
        values = [s for doc in yaml.safe_load_all(text) for s in _strings(doc)]
        comments = [m.group(1) for line in text.splitlines() if (m := re.search(r"(?:^|\s)#(.*)$", line))]
        return values + _not_a_bare_name([s for c in comments for s in re.findall(r"`([^`]+)`", c)])
    return [text]


def _cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file())


def _retrain_section() -> str:
    """The README's "Retraining jobs" section, up to the next section."""
    text = TOP_README.read_text()
    assert RETRAIN_SECTION in text, f"README.md has no section {RETRAIN_SECTION!r}"
    return text.split(RETRAIN_SECTION, 1)[1].split("\n## ", 1)[0]


def _sources() -> list[tuple[str, list[str]]]:
    """(label, code chunks) of every text that shows commands: the files under cluster/ and the README's
    retraining section."""
    out = [(str(p.relative_to(CLUSTER)), _code_chunks(p)) for p in _cluster_files()]
    return out + [("../README.md", _code_chunks(TOP_README, _retrain_section()))]


def _collect() -> list[tuple[str, list[str]]]:
    out = []
    for label, chunks in _sources():
        n = 0
        for chunk in chunks:
            for argv in _commands_in(chunk):
                n += 1
                out.append((f"{label}#{n}", argv))
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
    for label, chunks in _sources():
        for chunk in chunks:
            assert len(MENTION.findall(chunk)) == len(_commands_in(chunk)), (label, chunk)
    where = {w.split("#")[0] for w, _ in COMMANDS}
    assert {"README.md", "kuberay/rayjob.yaml", "kuberay/rayjob-shared.yaml", "kuberay/retrain-cronjob.yaml",
            "retrain.cron", "../README.md"} <= where, where
    assert sum(w.startswith("README.md#") for w, _ in COMMANDS) >= 3
    retrains = [w for w, argv in COMMANDS if argv[1:2] == ["retrain"]]
    assert {w.split("#")[0] for w in retrains} >= {"kuberay/retrain-cronjob.yaml", "retrain.cron", "../README.md"}
    assert sum(w.startswith("../README.md#") for w in retrains) >= 3, retrains  # bash, submit, Python


def test_extraction_handles_continuations_separators_and_env():
    code = ("ray job submit --address http://h:8265 -- \\\n  rayoffline train --out r \\\n  --steps 5 # note\n"
            "cd x && RAY_ADDRESS=auto rayoffline eval r; pip install rayoffline\n"
            "flock -n l ray job submit -- rayoffline retrain j.yaml --set 'a=[x>y]' >> log 2>&1 && echo done\n")
    assert _commands_in(code) == [["rayoffline", "train", "--out", "r", "--steps", "5"],
                                  ["rayoffline", "eval", "r"], ["rayoffline", "retrain", "j.yaml", "--set", "a=[x>y]"]]
    assert _ray_job_submits(code) == [(["--address", "http://h:8265"], ["rayoffline", "train", "--out", "r",
                                                                        "--steps", "5"]),
                                      ([], ["rayoffline", "retrain", "j.yaml", "--set", "a=[x>y]"])]
    assert _ray_job_submits("`ray job submit` runs the command on the head") == []
    assert _python_strings('c.submit_job(entrypoint="rayoffline eval r "\n "--episodes 2")') == [
        "rayoffline eval r --episodes 2"]


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


# ---------------------------------------------------------------- scheduled retraining
RETRAIN_EXAMPLE = REPO / "tune_configs" / "retrain" / "pendulum-daily.yaml"
CRON = CLUSTER / "retrain.cron"
RETRAIN_PATH_KEYS = ("registry", "work_dir", "data.dataset")


def _cronjobs() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _kuberay_docs() if d["kind"] == "CronJob"]


def _config_maps() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for _, d in _kuberay_docs() if d["kind"] == "ConfigMap"}


def _pod_spec(cronjob: dict) -> dict:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _submit_params(options: list[str], entry: list[str]) -> dict:
    """Ray's own `ray job submit` command parses the options (no request is sent): its params."""
    import click
    from ray.dashboard.modules.job.cli import submit
    try:
        return submit.make_context("submit", [*options, "--", *entry]).params
    except click.ClickException as e:
        pytest.fail(f"`ray job submit {shlex.join(options)} -- ...` does not parse with Ray's CLI: "
                    f"{e.format_message()}")


def _one_submit(code: str, where: str) -> tuple[dict, argparse.Namespace]:
    submits = _ray_job_submits(code)
    assert len(submits) == 1, f"{where}: expected one `ray job submit ... -- rayoffline retrain ...`, got {submits}"
    options, entry = submits[0]
    ns = _parse(entry)
    assert ns.command == "retrain", f"{where}: the submitted command is not `rayoffline retrain`: {entry}"
    return _submit_params(options, entry), ns


def _job_paths(job) -> dict[str, str]:
    """The job's paths that the driver (head) and the Ray Train workers must all see, by job key."""
    paths = {"registry": job.registry, "work_dir": job.work_dir, "data.dataset": job.data.dataset}
    paths.update({f"data.append[{i}]": a for i, a in enumerate(job.data.append)})
    return paths


def _check_job_for_cluster(job, shared: set[str], gpus: float, cpus: float, where: str) -> None:
    """A job submitted to a cluster: every local path absolute and on a volume every node mounts at the same
    path (a relative one would resolve inside Ray's copy of the working directory on the head), work_dir not on
    object storage, and its training fits the cluster."""
    from rayoffline.learner.config import build_config
    assert shared, where
    for key, value in _job_paths(job).items():
        if key == "work_dir":
            assert _is_local(value), f"{where}: work_dir {value} must be a path (run directories on object storage " \
                                     f"are not supported yet)"
        if _is_local(value):
            assert value.startswith("/") and any(value.startswith(m + "/") for m in shared), \
                f"{where}: job key {key} = {value} is not on a volume mounted on every node ({sorted(shared)})"
    run = build_config(job.train.algo, job.train.config, None, steps=job.train.steps)["run"]
    assert run.num_workers * run.gpus_per_worker <= gpus, f"{where}: asks for more GPUs than the cluster has"
    assert run.num_workers * run.cpus_per_worker < cpus or not run.num_workers, f"{where}: no CPU left for Ray Data"


def test_example_retrain_job_loads_and_its_training_config_builds():
    from rayoffline.learner.config import build_config
    from rayoffline.retrain import load_job
    job = load_job(RETRAIN_EXAMPLE, ["data.append=[logs/2026-12-02.parquet]"])
    assert job.name == RETRAIN_EXAMPLE.stem and job.data.append == ("logs/2026-12-02.parquet",)
    assert job.train.algo, "the first run of a job has no version to take the algorithm from"
    cfg = build_config(job.train.algo, job.train.config, None, steps=job.train.steps)
    assert cfg["algo_name"] == job.train.algo and cfg["run"].steps == job.train.steps
    # the paths are relative to the repository root, for a run on one machine, and never a shared builtin: cache
    assert all(_is_local(v) and not v.startswith("/") for v in (job.registry, job.work_dir, job.data.dataset))


def test_retrain_cronjob_schedule_and_concurrency():
    cronjobs = _cronjobs()
    assert {p.name for p, _ in cronjobs} >= {"retrain-cronjob.yaml"}
    for path, cj in cronjobs:
        assert cj["apiVersion"] == "batch/v1", path
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?", cj["metadata"]["name"]), path  # <= 52 chars
        spec = cj["spec"]
        assert len(str(spec["schedule"]).split()) == 5, f"{path}: schedule is not a 5-field cron expression"
        # one writer per registry alias: an object-store registry cannot arbitrate concurrent promotions
        assert spec["concurrencyPolicy"] == "Forbid", path
        assert isinstance(spec["startingDeadlineSeconds"], int) and spec["startingDeadlineSeconds"] > 0, path
        job = spec["jobTemplate"]["spec"]
        assert isinstance(job["backoffLimit"], int) and job["backoffLimit"] >= 0, path
        pod = _pod_spec(cj)
        assert pod["restartPolicy"] == ("Never" if "podFailurePolicy" in job else pod["restartPolicy"]), path
        assert pod["restartPolicy"] in ("Never", "OnFailure"), path
        if "activeDeadlineSeconds" in job:  # a stuck run must end before the next one is due (Forbid skips it)
            assert job["activeDeadlineSeconds"] < 24 * 3600, path


def test_retrain_cronjob_submits_to_the_rayclusters_head_service_and_ships_a_valid_job_file(tmp_path):
    from rayoffline.retrain import load_job
    config_maps = _config_maps()
    for path, cj in _cronjobs():
        pod = _pod_spec(cj)
        (container,) = pod["containers"]
        script = "\n".join([*container.get("command", []), *container.get("args", [])])
        params, ns = _one_submit(script, path.name)
        # the address: the dashboard port of the head service KubeRay creates for the RayCluster
        (cluster_doc,) = [d for p, d in _ray_docs("RayCluster") if p.name == "raycluster.yaml"]
        cluster = cluster_doc["spec"]
        url = urllib.parse.urlsplit(params["address"])
        head = cluster["headGroupSpec"]
        ports = {p["name"]: p["containerPort"] for c in _containers(head) for p in c.get("ports", [])}
        assert url.scheme == "http" and url.port == ports["dashboard"] == 8265, params["address"]
        assert url.hostname.split(".")[0] == f"{cluster_doc['metadata']['name']}-head-svc", params["address"]
        assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0", "the job API only listens on the pod"
        env = {e["name"]: e for e in container.get("env", [])}
        if "RAY_API_SERVER_ADDRESS" in env:  # what the other `ray job` calls and JobSubmissionClient() use
            assert env["RAY_API_SERVER_ADDRESS"]["value"] == params["address"]
        # a submission id per attempt (Ray refuses one it already knows): a variable the pod's env defines
        ids = re.findall(r"\$\{?(\w+)", params["submission_id"] or "")
        assert ids and all(i in env for i in ids), f"{path}: submission id {params['submission_id']!r}"
        image = container["image"]
        tag = re.search(r"rayproject/ray:(\d+\.\d+\.\d+)", image)
        assert tag is None or tag.group(1) == str(cluster["rayVersion"]), image
        # the job file: shipped with --working-dir from a ConfigMap mounted in this pod, named relative to it
        working_dir = params["working_dir"]
        assert working_dir and not ns.job.startswith("/"), \
            f"{path}: the entrypoint runs on the head; ship the job file with --working-dir and name it relative to it"
        job_path = (Path(working_dir) / ns.job).as_posix()
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        found = []
        for m in container.get("volumeMounts", []):
            cm = volumes[m["name"]].get("configMap")
            if cm is None:
                continue
            if m.get("subPath") and m["mountPath"] == job_path:
                found.append((cm["name"], m["subPath"]))
            elif not m.get("subPath") and job_path.startswith(m["mountPath"].rstrip("/") + "/"):
                found.append((cm["name"], job_path[len(m["mountPath"].rstrip("/")) + 1:]))
        assert len(found) == 1, f"{path}: {job_path} is not a file of a ConfigMap mounted in the submitting pod"
        cm_name, key = found[0]
        assert key in config_maps.get(cm_name, {}), f"{path}: ConfigMap {cm_name} has no key {key}"
        assert not any(m["mountPath"].rstrip("/") == working_dir.rstrip("/") and "subPath" not in m
                       for m in container.get("volumeMounts", [])), \
            f"{path}: a whole ConfigMap volume at the working dir uploads its hidden ..data symlinks too; use subPath"
        job_file = tmp_path / key
        job_file.write_text(config_maps[cm_name][key])
        job = load_job(job_file, ns.set)  # with the command's --set overrides, as on the head
        workers = cluster["workerGroupSpecs"]
        gpus = sum(g.get("replicas", 0) * _group_gpus(g) for g in workers)
        cpus = sum(g.get("replicas", 0) * _group_cpus(g) for g in workers)
        _check_job_for_cluster(job, _shared_mounts(cluster), gpus, cpus, f"{path.name}: {key}")
        # later runs find this run's Ray job through its metadata (one writer per alias)
        metadata = json.loads(params["metadata_json"])
        assert metadata.get("retrain_job") == "$RETRAIN_JOB" and env["RETRAIN_JOB"]["value"] == job.name, metadata


def test_cluster_copy_of_the_example_job_differs_only_in_where_it_runs(tmp_path):
    from rayoffline.retrain import load_job
    example = load_job(RETRAIN_EXAMPLE)
    copy = tmp_path / RETRAIN_EXAMPLE.name
    copy.write_text(_config_maps()["retrain-jobs"][RETRAIN_EXAMPLE.name])
    cluster = load_job(copy)
    same = ("name", "alias", "evaluate", "gate")
    assert [getattr(example, k) for k in same] == [getattr(cluster, k) for k in same]
    assert (example.train.algo, example.train.steps, example.train.warm_start) == \
        (cluster.train.algo, cluster.train.steps, cluster.train.warm_start)
    assert example.data.holdout == cluster.data.holdout and example.data.holdout_seed == cluster.data.holdout_seed


def _shared_everywhere() -> set[str]:
    """Paths mounted at the same place on every node of a KubeRay cluster here or of the `ray up` cluster."""
    shared = {m for _, spec in _cluster_specs() for m in _shared_mounts(spec)}
    for option in _ray_up()["docker"].get("run_options", []):  # `ray up`: host volumes bound into every container
        if m := re.fullmatch(r"(?:-v|--volume)[ =](/[^:]+):(/[^:]+)(?::\w+)?", option):
            shared.add(m.group(2).rstrip("/"))
    return shared


def test_crontab_submits_a_valid_job_without_overlap():
    from rayoffline.retrain import load_job
    entries = [line for line in CRON.read_text().splitlines()
               if line.strip() and not line.startswith("#") and not ENV_ASSIGNMENT.match(line)]
    assert entries, CRON
    for line in entries:
        fields = line.split(None, 5)
        assert len(fields) == 6 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5]), line
        command = fields[5]
        assert not re.search(r"(?<!\\)%", command), "cron turns an unescaped % into a newline"
        command = command.replace("\\%", "%")
        params, ns = _one_submit(command, CRON.name)
        tokens = _tokens(_shell_lines(command)[0])
        submit_at = next(i for i in range(len(tokens)) if tokens[i:i + 3] == ["ray", "job", "submit"])
        assert "flock" in tokens[:submit_at] and "-n" in tokens[tokens.index("flock"):submit_at], \
            "overlapping runs: flock -n LOCK ray job submit ..."
        assert params["no_wait"] is False, "the lock must be held until the Ray job ends"
        assert "SUCCEEDED" in command[command.index(" -- "):], "`ray job submit` exits 0 for a stopped job too"
        cd = re.match(r"cd (\S+) &&", command)
        assert cd and params["working_dir"] == ".", "the job file travels with --working-dir . from the checkout"
        job = load_job(REPO / ns.job, ns.set)  # the checkout is this repository
        shared = _shared_everywhere()
        _check_job_for_cluster(job, shared, float("inf"), float("inf"), CRON.name)


def test_retrain_commands_name_job_files_that_load():
    """Every `rayoffline retrain JOB` shown names a job file of this repository (by path, or by file name where
    the file travels with a working directory or a ConfigMap) that loads with the command's --set overrides."""
    from rayoffline.retrain import load_job
    retrains = [(w, _parse(argv)) for w, argv in COMMANDS if argv[1:2] == ["retrain"]]
    assert retrains
    shipped = {p.name: p for p in (REPO / "tune_configs" / "retrain").glob("*.yaml")}
    for where, ns in retrains:
        if ns.job.isupper() or ns.job.startswith(("JOB", "jobs/")):  # JOB.yaml placeholders
            continue
        path = REPO / ns.job if (REPO / ns.job).is_file() else shipped.get(Path(ns.job).name)
        in_config_map = any(Path(ns.job).name in data for data in _config_maps().values())
        assert path is not None or in_config_map, f"{where}: no job file {ns.job}"
        if path is not None:
            load_job(path, ns.set)


# ---------------------------------------------------------------- the CronJob's submitter, against a fake Ray
FAKE_RAY_CLI = '''\
import json, os, sys
state_file = os.environ["FAKE_RAY_STATE"]
state = json.load(open(state_file)) if os.path.exists(state_file) else {}
def save():  # atomically: the test reads the file while a script runs
    with open(state_file + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(state_file + ".tmp", state_file)
assert sys.argv[1] == "job", sys.argv
cmd, rest = sys.argv[2], sys.argv[3:]
outcome = os.environ["FAKE_OUTCOME"]
if cmd == "submit":
    opts, entry = rest[:rest.index("--")], rest[rest.index("--") + 1:]
    sid = opts[opts.index("--submission-id") + 1]
    if sid in state:
        sys.exit(f"Job with submission_id {sid} already exists")
    meta = json.loads(opts[opts.index("--metadata-json") + 1]) if "--metadata-json" in opts else {}
    address = opts[opts.index("--address") + 1]
    state[sid] = {"status": outcome, "metadata": meta, "entrypoint": entry, "address": address}
    save()
    sys.exit(1 if outcome == "FAILED" else 0)  # Ray 2.60: 1 for FAILED only (STOPPED, RUNNING after a lost stream: 0)
if cmd == "logs":  # following a job until it ends
    state[rest[-1]]["status"] = outcome
    save()
elif cmd == "stop":
    state[rest[-1]]["status"] = "STOPPED"
    save()
'''

FAKE_JOB_SUBMISSION = '''\
import enum, json, os

class JobStatus(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    def is_terminal(self):
        return self.value in ("STOPPED", "SUCCEEDED", "FAILED")

class _Details:
    def __init__(self, sid, d):
        self.submission_id, self.status, self.metadata = sid, JobStatus(d["status"]), d["metadata"]

class JobSubmissionClient:
    def __init__(self, address=None):
        assert address or os.environ.get("RAY_API_SERVER_ADDRESS")
        path = os.environ["FAKE_RAY_STATE"]
        self.state = json.load(open(path)) if os.path.exists(path) else {}

    def list_jobs(self):
        return [_Details(sid, d) for sid, d in self.state.items()]

    def get_job_status(self, sid):
        if sid not in self.state:
            raise RuntimeError(f"Request failed with status code 404: Job {sid} does not exist.")
        return JobStatus(self.state[sid]["status"])
'''


@pytest.fixture
def submitter(tmp_path):
    """Runs the CronJob's container script as its pod would, with `ray` and `ray.job_submission` replaced by fakes
    that keep the cluster's jobs in a JSON file: run(pod, k8s_job, outcome, state) -> (returncode, output,
    state after)."""
    import subprocess
    import sys
    (cj,) = [d for p, d in _cronjobs() if p.name == "retrain-cronjob.yaml"]
    (container,) = _pod_spec(cj)["containers"]
    assert container["command"][:1] == ["/bin/bash"], container["command"]
    env_values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    bin_dir, lib = tmp_path / "bin", tmp_path / "lib" / "ray"
    bin_dir.mkdir()
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "job_submission.py").write_text(FAKE_JOB_SUBMISSION)
    (bin_dir / "ray").write_text(f"#!{sys.executable}\n{FAKE_RAY_CLI}")
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    state_file = tmp_path / "state.json"

    def start(pod: str, k8s_job: str, outcome: str, state: dict | None = None):
        state_file.write_text(json.dumps(state or {}))
        env = {**os.environ, **env_values, "POD_NAME": pod, "JOB_NAME": k8s_job, "FAKE_OUTCOME": outcome,
               "FAKE_RAY_STATE": str(state_file), "TMPDIR": str(tmp_path),
               "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               "PYTHONPATH": str(lib.parent)}
        return subprocess.Popen([*container["command"], *container["args"]], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def run(pod: str, k8s_job: str, outcome: str, state: dict | None = None):
        proc = start(pod, k8s_job, outcome, state)
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out, json.loads(state_file.read_text())

    run.start, run.state = start, lambda: json.loads(state_file.read_text())
    return run


def _live(k8s_job: str, status: str = "RUNNING", job: str = "pendulum-daily") -> dict:
    return {"status": status, "metadata": {"retrain_job": job, "k8s_job": k8s_job}}


def test_submitter_fails_unless_the_ray_job_succeeded(submitter):
    yesterday = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)).strftime("%Y-%m-%d")
    rc, out, state = submitter("run1-abcde", "run1", "SUCCEEDED")
    assert rc == 0, out
    job = state["run1-abcde"]
    assert job["metadata"] == {"retrain_job": "pendulum-daily", "k8s_job": "run1"}
    assert job["entrypoint"] == ["rayoffline", "retrain", "pendulum-daily.yaml", "--set",
                                 f"data.append=[/mnt/shared/inbox/{yesterday}.parquet]"]
    assert job["address"] == "http://rayoffline-head-svc:8265"
    for outcome in ("FAILED", "STOPPED"):  # `ray job submit` exits 0 for a stopped job: the status check catches it
        rc, out, state = submitter("run2-abcde", "run2", outcome)
        assert rc != 0 and state["run2-abcde"]["status"] == outcome, (outcome, out)


def test_submitter_keeps_one_writer_per_job(submitter):
    # an earlier run's Ray job still runs (its pod is gone): refuse, submit nothing
    rc, out, state = submitter("run3-abcde", "run3", "SUCCEEDED", {"run2-xyz": _live("run2")})
    assert rc != 0 and list(state) == ["run2-xyz"] and "run2-xyz" in out, out
    # a retried pod of the same run follows the Ray job its predecessor submitted instead of starting another
    rc, out, state = submitter("run2-fghij", "run2", "SUCCEEDED", {"run2-xyz": _live("run2")})
    assert rc == 0 and list(state) == ["run2-xyz"] and state["run2-xyz"]["status"] == "SUCCEEDED", out
    # finished jobs of this job, and live ones of other jobs, do not block a new submission
    before = {"run2-xyz": _live("run2", "FAILED"), "other-1": _live("x", job="other-daily")}
    rc, out, state = submitter("run2-klmno", "run2", "SUCCEEDED", before)
    assert rc == 0 and state["run2-klmno"]["status"] == "SUCCEEDED" and len(state) == 3, out


def test_submitter_stops_its_ray_job_when_the_pod_is_terminated(submitter):
    import signal
    proc = submitter.start("run4-abcde", "run4", "RUNNING")  # submitted; the job runs, the pod waits for it
    deadline = time.monotonic() + 30
    while "run4-abcde" not in submitter.state() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # in the wait for the final status
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out
    assert submitter.state()["run4-abcde"]["status"] == "STOPPED", out
