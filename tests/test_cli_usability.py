"""Issue 6: the CLI and Python API as a new user meets them (terminal, bad arguments, summaries, threads)."""
from __future__ import annotations

import inspect
import json
import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest
import torch

import rayoffline
from rayoffline.cli import main

TINY = ["--set", "batch_size=32", "--set", "algo.hidden=[16,16]", "--set", "threads=1"]


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """main() as the console script runs it: argparse's SystemExit becomes the exit status."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _run_in_pty(argv: list[str], timeout: float = 300.0) -> tuple[int, str]:
    """Run `python -m rayoffline ARGV` with stdin/stdout/stderr on a pseudo-terminal, as in a real terminal."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execvpe(sys.executable, [sys.executable, "-m", "rayoffline", *argv], os.environ)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


# ----- 1. a terminal: the progress bar, and a failed start leaves nothing behind ---------------------------
def test_train_in_a_terminal_shows_the_progress_bar(ray_cluster, tmp_path):
    out = tmp_path / "run"
    code, text = _run_in_pty(["train", "--algo", "bc", "--data", "builtin:pendulum-medium", "--steps", "60",
                              "--out", str(out), "--set", "log_every=20", "--set", "eval_episodes=1", *TINY])
    assert code == 0, text
    assert "Traceback" not in text
    assert "60/60" in text and "upd" in text  # tqdm's bar reached the end
    assert (out / "result.json").exists()


def test_run_that_fails_before_its_first_update_leaves_nothing(ray_cluster, tmp_path, monkeypatch, capsys):
    from rayoffline.learner import logger
    out = tmp_path / "run"

    def broken_bar(self, *a, **k):
        raise ModuleNotFoundError("No module named 'tqdm'")
    monkeypatch.setattr(logger.RunLogger, "advance", broken_bar)
    argv = ["train", "--algo", "bc", "--data", "builtin:pendulum-medium", "--steps", "20", "--out", str(out),
            "--set", "eval_episodes=0", *TINY]
    with pytest.raises(ModuleNotFoundError):
        main(argv)
    assert not out.exists()
    out.mkdir()  # an empty directory the user made is kept, emptied of what the run wrote
    with pytest.raises(ModuleNotFoundError):
        main(argv)
    assert out.is_dir() and not any(out.iterdir())
    monkeypatch.undo()
    code, _, err = _cli(argv, capsys)
    assert code == 0, err


# ----- 2. threads ----------------------------------------------------------------------------------------
def test_default_threads_is_one_outside_ray_and_explicit_counts_are_kept():
    from rayoffline.learner.threads import set_threads
    before = torch.get_num_threads()
    try:
        assert set_threads(0) == 1 and torch.get_num_threads() == 1
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_default_threads_inside_a_ray_task_is_its_cpu_allotment(ray_cluster):
    @ray_cluster.remote(num_cpus=3)
    def inside() -> tuple[int, int]:
        from rayoffline.learner.threads import set_threads
        return set_threads(0), torch.get_num_threads()

    assert ray_cluster.get(inside.remote()) == (3, 3)


# ----- 3. --set values are parsed against the field's type ------------------------------------------------
@pytest.mark.parametrize("value", ["off", "on", "auto"])
def test_set_progress_accepts_the_documented_values(value):
    from rayoffline.learner.config import build_config
    assert build_config("iql", None, [f"progress={value}"])["run"].progress == value


def test_set_values_follow_field_types_and_yaml_files_use_yaml_1_2(tmp_path):
    from rayoffline.errors import ConfigError
    from rayoffline.learner.config import build_config
    cfg = build_config("iql", None, ["device=cpu", "steps=1e3", "algo.hidden=[8,8]", "algo.beta=1e-1",
                                     "algo.normalize_obs=false"])
    assert cfg["run"].device == "cpu" and cfg["run"].steps == 1000 and cfg["members"][0].hidden == (8, 8)
    assert cfg["members"][0].beta == 0.1 and cfg["members"][0].normalize_obs is False
    with pytest.raises(ConfigError, match="config key 'steps'"):
        build_config("iql", None, ["steps=many"])
    with pytest.raises(ConfigError, match="config key 'algo.normalize_obs'"):
        build_config("iql", None, ["algo.normalize_obs=off"])  # booleans are true/false, not YAML 1.1's off
    f = tmp_path / "c.yaml"
    f.write_text("progress: off\nalgo:\n  actor_lr: 1e-4\nmembers:\n  - {beta: 1}\n  - {beta: 2, seed: 5}\n")
    cfg = build_config("iql", f)
    assert cfg["run"].progress == "off" and cfg["members"][1].actor_lr == 1e-4 and cfg["seeds"] == [0, 5]
    cfg = build_config("iql", None, ["members=[{beta: 1}, {beta: 3}]"])
    assert [m.beta for m in cfg["members"]] == [1.0, 3.0]


# ----- 9. every command with bad arguments: one line, exit 2, no traceback --------------------------------
BAD = [
    ([], "the following arguments are required: command"),
    (["nope"], "invalid choice"),
    (["train"], "--out"),
    (["train", "--out", "{tmp}/r", "--steps", "ten"], "invalid int value"),
    (["train", "--algo", "iql", "--out", "{tmp}/r"], "needs an algorithm (--algo) and a dataset (--data)"),
    (["train", "--algo", "iql", "--data", "builtin:pendulum-medium", "--out", "{tmp}/file"], "is a file"),
    (["train", "--algo", "iql", "--data", "builtin:pendulum-medium", "--out", "{tmp}/full"], "not a rayoffline run"),
    (["train", "--algo", "iql", "--data", "builtin:nope", "--out", "{tmp}/r"], "builtin"),
    (["train", "--algo", "iql", "--data", "{tmp}/missing", "--out", "{tmp}/r"], "missing' not found"),
    (["train", "--algo", "iql", "--data", "builtin:pendulum-medium", "--out", "{tmp}/r", "--steps", "0"], "steps"),
    (["train", "--algo", "iql", "--data", "builtin:pendulum-medium", "--out", "{tmp}/r", "--set", "x"], "key=value"),
    (["train", "--algo", "iql", "--data", "builtin:pendulum-medium", "--out", "{tmp}/r", "--config", "{tmp}/none.yaml"],
     "cannot read config file"),
    (["train", "--resume", "--out", "{tmp}/missing"], "does not exist"),
    (["train", "--resume", "--out", "{tmp}/full"], "not a rayoffline run directory"),
    (["train", "--algo", "iql", "--data", "builtin:pendulum-medium", "--out", "{tmp}/r", "--allow-data-change"],
     "only applies with --resume"),
    (["train", "--algo", "bc", "--data", "builtin:pendulum-medium", "--out", "{tmp}/r", "--num-workers", "2",
      "--address", "127.0.0.1:1", "--set", "eval_episodes=0", "--steps", "10"], "nothing answers at 127.0.0.1:1"),
    (["train", "--algo", "bc", "--data", "builtin:pendulum-medium", "--out", "{tmp}/r", "--num-workers", "2",
      "--address", "nowhere", "--set", "eval_episodes=0", "--steps", "10"], "expected auto, HOST:PORT"),
    (["train", "--algo", "bc", "--data", "builtin:pendulum-medium", "--out", "{tmp}/r", "--num-workers", "-1"],
     "num_workers"),
    (["train", "--algo", "bc", "--data", "builtin:pendulum-medium", "--out", "{tmp}/r", "--data-mode", "x"],
     "invalid choice"),
    (["train", "--algo", "bc", "--data", "builtin:pendulum-medium", "--out", "s3://bucket/runs/x"],
     "a run directory on object storage is not supported yet"),
    (["eval"], "run_dir"),
    (["eval", "{tmp}/missing"], "does not exist"),
    (["eval", "{tmp}/full"], "not a rayoffline run directory"),
    (["eval", "{tmp}/file"], "is a file"),
    (["eval", "{tmp}/full", "--episodes", "0"], "--episodes must be a positive integer"),
    (["eval", "{tmp}/full", "--episodes", "-3"], "--episodes must be a positive integer"),
    (["algos", "extra"], "unrecognized arguments"),
    (["demo", "--steps", "x"], "invalid int value"),
    (["demo", "--steps", "0", "--out", "{tmp}/demo"], "steps"),
    (["data"], "data_command"),
    (["data", "convert", "{tmp}/missing.csv", "--out", "{tmp}/d"], "missing.csv"),
    (["data", "convert", "builtin:pendulum-medium"], "--out"),
    (["data", "append", "{tmp}/missing.csv", "--to", "{tmp}/missing"], "missing"),
    (["data", "inspect", "{tmp}/missing"], "missing"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a)[:60] or "(none)" for a, _ in BAD])
def test_bad_arguments_give_one_line_and_exit_2(argv, message, ray_cluster, tmp_path, capsys):
    (tmp_path / "file").write_text("not a run\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = _cli(argv, capsys)
    assert code == 2, (code, out, err)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("rayoffline: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine\n" and not (tmp_path / "r").exists()


# ----- 10. what a run prints -------------------------------------------------------------------------------
def test_member_run_prints_a_table_rates_and_a_line_per_interval(ray_cluster, tmp_path, capsys):
    cfg = tmp_path / "members.yaml"
    cfg.write_text("members:\n  - {alpha: 1.0}\n  - {alpha: 4.0, seed: 7}\n")
    out = tmp_path / "run"
    code, stdout, err = _cli(["train", "--algo", "td3_bc", "--data", "builtin:pendulum-medium", "--steps", "40",
                              "--out", str(out), "--config", str(cfg), "--set", "log_every=10",
                              "--set", "eval_episodes=1", *TINY], capsys)
    assert code == 0, err
    # stderr is not a terminal here: one line per log interval, with passes/s and member-updates/s
    steps = [line for line in err.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["10/40", "20/40", "30/40", "40/40"]
    assert "passes/s" in steps[0] and "member-updates/s" in steps[0] and "K=2" in steps[0]
    result = json.loads((out / "result.json").read_text())
    best = result["best_member"]
    table = stdout.splitlines()
    assert "passes/s" in table[0] and "member-updates/s" in table[0]
    header = next(line for line in table if line.startswith("member"))
    assert "seed" in header and "alpha" in header and "normalized" in header
    rows = [line for line in table if line[:1].isdigit()]
    assert len(rows) == 2 and rows[best].startswith(f"{best} *") and "7" in rows[1].split()[1:3]
    assert result["member_updates_per_s"] == pytest.approx(2 * result["updates_per_s"])
    # a resume says where it starts
    code, _, err = _cli(["train", "--resume", "--out", str(out), "--steps", "50", "--set", "eval_episodes=0"], capsys)
    assert code == 0 and "resuming" in err and "at step 40 of 50 from step_00000040.pt" in err


def test_progress_off_prints_only_the_summary(ray_cluster, tmp_path, capsys):
    code, stdout, err = _cli(["train", "--algo", "bc", "--data", "builtin:pendulum-medium", "--steps", "10",
                              "--out", str(tmp_path / "r"), "--set", "eval_episodes=0", "--set", "progress=off",
                              "--set", "log_every=5", *TINY], capsys)
    assert code == 0 and err == "" and "bc: 10 steps" in stdout


def test_example_member_config_finishes_in_minutes():
    import yaml
    cfg = yaml.safe_load((Path(__file__).parents[1] / "tune_configs" / "cql_alphas.yaml").read_text())
    assert cfg["steps"] <= 3000  # ~12 member-updates/s for K=4 CQL at 3x256 on one core: see the file


# ----- 11. the Python API and the CLI's help -----------------------------------------------------------------
def test_python_api_has_real_signatures_and_a_clean_namespace():
    sig = inspect.signature(rayoffline.train)
    assert list(sig.parameters)[:4] == ["algo", "data", "out", "steps"] and "resume" in sig.parameters
    assert "builtin:NAME" in rayoffline.train.__doc__
    assert "episodes" in inspect.signature(rayoffline.evaluate_run).parameters
    import types
    public = {n for n in dir(rayoffline) if not n.startswith("_")
              and not isinstance(getattr(rayoffline, n), types.ModuleType)}  # subpackages appear once imported
    assert public == {"train", "evaluate_run", "load_run", "convert", "append", "load", "tune"}
    assert callable(rayoffline.tune) and list(inspect.signature(rayoffline.tune).parameters)[:3] == [
        "sweep", "out", "overrides"]  # the function, not the sweep package (rayoffline/sweep/)
    assert rayoffline.__version__ and "Any" not in dir(rayoffline) and "annotations" not in dir(rayoffline)


def test_version_and_help_texts(capsys):
    code, out, _ = _cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"rayoffline {rayoffline.__version__}"
    code, out, _ = _cli(["train", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    assert "gradient updates per member (default:" in flat and "run seed" in flat and "(default: the config's, else 0)" in flat


def test_algos_names_the_networks_each_algorithm_has(capsys):
    code, out, _ = _cli(["algos"], capsys)
    assert code == 0
    blocks = {b.split()[0]: b for b in out.split("\n\n") if b.strip()}
    assert "Hidden layer widths of the policy network." in blocks["bc"]
    assert "value network" in blocks["iql"] and "value" not in blocks["td3_bc"].split("algo.hidden")[1].split("\n")[0]
    assert "Q-network" in blocks["discrete_cql"]
    assert "every MLP" not in out
