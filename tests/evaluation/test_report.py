"""`rayoffline report`: the HTML page of a run and of a sweep (evaluation/report.py), checked as HTML in Python and
rendered in headless Chromium (a screenshot that is not blank; every embedded image decoded by the browser)."""
from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

import rayoffline
from rayoffline.cli import main
from rayoffline.evaluation import report as rep

DATA = "builtin:pendulum-medium"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on this machine (`apt-get install chromium`; `make test` installs "
                             "it where apt-get runs as root)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 2-member IQL run: 300 steps, metrics every 50, evaluations at 150 and 300."""
    out = tmp_path_factory.mktemp("report") / "run"
    rayoffline.train("iql", DATA, out, steps=300, config={
        "batch_size": 64, "log_every": 50, "eval_every": 150, "eval_episodes": 2, "progress": "off",
        "algo": {"hidden": [32, 32]}, "members": [{"seed": 0}, {"seed": 1, "expectile": 0.9}]})
    return out


OPE = {"checkpoint": "checkpoints/step_00000300.pt", "step": 300, "gamma": 0.99, "level": 0.95,
       "holdout": {"episodes": 10, "transitions": 2000, "mc_return": -61.25},
       "members": [0, 1], "online": [-1402.5, None],
       "estimates": {
           "fqe": [{"member": 0, "value": -70.125, "low": -80.5, "high": -60.25, "ess": None, "warning": None},
                   {"member": 1, "value": -55.5, "low": -66.0, "high": -44.75, "ess": None, "warning": None}],
           "wis": [{"member": 0, "value": -72.0, "low": -90.0, "high": -58.0, "ess": 7.5, "warning": None},
                   {"member": 1, "value": -49.0, "low": -95.0, "high": -20.0, "ess": 1.25,
                    "warning": "ESS 1.25 below 5: a few episodes carry the estimate"}]}}
FLAG = {"flag": "q_divergence", "member": 1, "step": 250, "message": "Q mean fell 30x below the dataset's returns"}


@pytest.fixture(scope="module")
def full_run(run_dir, tmp_path_factory):
    """The run with what other commands add: ope.json, diag/* metrics and result.json diagnostics flags."""
    d = tmp_path_factory.mktemp("report") / "full"
    shutil.copytree(run_dir, d)
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        if "loss/critic" in r:
            r["diag/q_gap"] = [r["step"] / 100.0, -r["step"] / 50.0]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = json.loads((d / "result.json").read_text())
    diag = res.setdefault("diagnostics", {})  # a run of a rayoffline with diagnostics has some: add to them
    diag["flags"] = [*(diag.get("flags") or []), FLAG]
    diag["last"] = {**(diag.get("last") or {}), "diag/q_gap": [3.0, -6.0]}
    (d / "result.json").write_text(json.dumps(res))
    (d / "ope.json").write_text(json.dumps(OPE))
    return d


@pytest.fixture(scope="module")
def sweep_dir(ray_cluster, tmp_path_factory):
    """One small fused sweep: 2 configurations (two swept keys, one of them a grid of one), one seed, 100 steps."""
    out = tmp_path_factory.mktemp("report") / "sweep"
    rayoffline.tune({"algo": "iql", "data": DATA, "name": "rep",
                     "config": {"steps": 100, "log_every": 50, "eval_every": 50, "eval_episodes": 1, "batch_size": 64,
                                "algo": {"hidden": [16, 16]}},
                     "space": {"algo.beta": {"grid": [0.3, 10.0]}, "algo.expectile": {"grid": [0.7]}},
                     "seeds": [0], "metric": "eval/return_mean", "mode": "max", "resources": {"cpus": 1}},
                    out=out, quiet=True)
    return out


# -------------------------------------------------------------------------------------------------- HTML checks

class _Page(HTMLParser):
    """Every tag with its attributes, the <img> sources, and the text of each element with a class."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.imgs: list[str] = []
        self.text: list[str] = []
        self.classed: dict[str, list[str]] = {}
        self._open: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        if tag not in ("img", "meta", "br"):
            self._open.append((tag, a.get("class")))

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        self.text.append(data)
        for _, cls in self._open:
            if cls:
                self.classed.setdefault(cls, []).append(data)


def _parse(html_text: str) -> _Page:
    p = _Page()
    p.feed(html_text)
    return p


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _check_self_contained(path: Path) -> _Page:
    """The page has a title, no script, no stylesheet or other resource from elsewhere, and every <img> is a
    data:image/png;base64 URI that decodes to a whole PNG (Pillow reads all of its pixels)."""
    from PIL import Image

    text = path.read_text(encoding="utf-8")
    page = _parse(text)
    assert re.search(r"<title>[^<]*rayoffline report[^<]*</title>", text)
    tags = {t for t, _ in page.tags}
    assert "script" not in tags and "link" not in tags and "iframe" not in tags and "object" not in tags
    assert "url(" not in text and "@import" not in text
    for tag, attrs in page.tags:
        if "src" in attrs:
            assert tag == "img" and attrs["src"].startswith("data:image/png;base64,"), (tag, attrs["src"][:60])
    for src in page.imgs:
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        w, h = _png_size(raw)
        assert w > 100 and h > 100
        img = Image.open(io.BytesIO(raw))
        img.load()
        assert img.size == (w, h)
    return page


def _cells(html_text: str) -> list[list[str]]:
    """Each table row's cell texts (tags stripped)."""
    rows = []
    for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", html_text, flags=re.S):
        rows.append([re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr, re.S)])
    return rows


# ------------------------------------------------------------------------------------------------------ run page

def test_series_reads_per_member_lists_and_scalars():
    rows = [{"step": 50, "loss/a": [1.0, 2.0]}, {"step": 60, "eval/x": 3.0}, {"step": 100, "loss/a": [3.0, None]},
            {"step": 100, "loss/a": [4.0, 5.0]}]  # a resumed run logged step 100 again: the later row wins
    steps, vals = rep.series(rows, "loss/a")
    assert steps.tolist() == [50, 100] and vals.tolist() == [[1.0, 2.0], [4.0, 5.0]]
    steps, vals = rep.series([{"step": 5, "loss/a": 1.5}, {"step": 10, "loss/a": None}], "loss/a")
    assert steps.tolist() == [5, 10] and vals.shape == (2, 1) and vals[0, 0] == 1.5 and np.isnan(vals[1, 0])
    assert rep.series(rows, "nothing")[0].size == 0


def test_run_page_header_curves_and_sections_not_available(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    out = run_dir / "report.html"
    assert capsys.readouterr().out.strip() == str(out.absolute())
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".report.html")]  # the temporary file is gone
    page = _check_self_contained(out)
    text = out.read_text(encoding="utf-8")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    res = json.loads((run_dir / "result.json").read_text())
    header = dict(r for r in _cells(text) if len(r) == 2)
    assert header["algorithm"] == "iql" and header["steps"] == "300" and header["members"] == "2"
    assert header["dataset"] == f"{DATA}, content hash {cfg['data_hash'][:12]}"
    assert header["updates/s"].startswith(f"{res['updates_per_s']:,.1f} passes/s")
    members = [r for r in _cells(text) if r and r[0] in ("0", "1") and len(r) == 5]
    assert [r[2] for r in members] == ["0.7", "0.9"]  # the only setting that differs between the members
    assert members[res["best_member"]][3].startswith(f"{res['members'][res['best_member']]['eval_return_mean']:.4g}")
    # learning curves, evaluation (with the behavior line), diagnostics where the run logged them, dataset; no OPE
    diag = any(k.startswith("diag/") for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               for k in json.loads(line))
    assert len(page.imgs) == 3 + diag
    assert [h for h in re.findall(r"<h2>(.*?)</h2>", text)] == [
        "Members", "Learning curves", "Evaluation", "Diagnostics", "Off-policy evaluation", "Dataset", "Files"]
    na = " ".join(page.classed.get("na", []))
    assert f"rayoffline ope {run_dir}" in na and ("no diag/* metrics" in na) != diag
    assert "step_00000300.pt" in text and "transitions" in text and "returns" in text  # files, dataset text


def test_run_page_shows_diagnostic_flags_and_ope(full_run):
    path = rep.report(full_run, out=full_run / "sub" / "page.html")
    assert path == (full_run / "sub" / "page.html").absolute()
    page = _check_self_contained(path)
    text = path.read_text(encoding="utf-8")
    assert len(page.imgs) == 5  # curves, evaluation, diagnostics, OPE, dataset
    flags = json.loads((full_run / "result.json").read_text())["diagnostics"]["flags"]
    red = " ".join(page.classed["flags"])
    assert f"{len(flags)} diagnostic flag" in red and all(f["message"] in red for f in flags)
    assert FLAG["flag"] in red and FLAG["message"] in red and "step 250" in red
    rows = _cells(text)
    assert ["diag/q_gap", "3", "-6"] in rows  # the last values per member
    ope = {(r[0], r[1]): r for r in rows if len(r) == 7 and r[0] in OPE["estimates"]}
    assert set(ope) == {(e, str(m)) for e in OPE["estimates"] for m in (0, 1)}
    assert ope[("fqe", "0")][2:6] == ["-70.12", "[-80.5, -60.25]", "-", "-1402"]
    assert ope[("wis", "1")][2:] == ["-49", "[-95, -20]", "1.25", "-", OPE["estimates"]["wis"][1]["warning"]]
    assert "gamma 0.99" in text and "-61.25" in text


def test_unfinished_run_without_diagnostics_or_dataset_says_what_is_missing(run_dir, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    (d / "result.json").unlink()
    rows = [{k: v for k, v in json.loads(x).items() if not k.startswith("diag/")}
            for x in (d / "metrics.jsonl").read_text().splitlines()]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if len(r) > 1))
    (d / "report.html").unlink(missing_ok=True)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["data"] = str(tmp_path / "gone-dataset")
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    page = _check_self_contained(rep.report(d))
    na = " ".join(page.classed["na"])
    assert "result.json is missing" in na and f"rayoffline train --resume --out {d}" in na
    assert f"the run's dataset {tmp_path / 'gone-dataset'} is gone" in na
    assert "behavior return not available" in na and "no diag/* metrics" in na and "diagnostics=basic" in na
    assert len(page.imgs) == 2  # curves and evaluation from metrics.jsonl


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "neither a run directory" in err and "sweep.yaml" in err and "config.yaml" in err
    assert list(empty.iterdir()) == []
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "o" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o").exists()
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["report", str(f)]) == 2 and "is a file" in capsys.readouterr().err
    proc = subprocess.run([_python(), "-m", "rayoffline", "report", str(empty)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "neither a run directory" in proc.stderr and list(empty.iterdir()) == []


def _python() -> str:
    import sys
    return sys.executable


# ---------------------------------------------------------------------------------------------------- sweep page

def test_sweep_page_ranks_configurations_and_plots_each_parameter(sweep_dir):
    path = rep.report(sweep_dir)
    page = _check_self_contained(path)
    text = path.read_text(encoding="utf-8")
    with open(sweep_dir / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    table = [r for r in _cells(text) if len(r) == 8 and r[0].isdigit()]
    assert [r[1] for r in table] == [r["trial"] for r in csv_rows]  # the ranking, best first
    assert [r[2:4] for r in table] == [[r["algo.beta"], r["algo.expectile"]] for r in csv_rows]
    assert [float(r[4]) for r in table] == [float(r["eval/return_mean mean"]) for r in csv_rows]
    best = csv_rows[0]["trial"]
    assert re.search(rf"<tr class=best><td[^>]*>1</td><td>{best}</td>", text)
    assert f"<b>{best}</b>" in text and "best.yaml" in text and f"trials/{best}" in text
    assert len(page.imgs) == 2  # metric against the parameters; the metric over steps
    # the same ranking from the trials alone (a sweep whose driver has not written results.csv yet)
    spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    partial = sweep_dir.parent / "partial"
    shutil.copytree(sweep_dir, partial, ignore=shutil.ignore_patterns("results.csv", "tune", "report.html"))
    rows, source = rep.sweep_rows(partial, spec)
    assert source == "trials"
    means = {r["trial"]: r["mean"] for r in rows}
    for r in csv_rows:
        assert means[r["trial"]] == pytest.approx(float(r["eval/return_mean mean"]), rel=1e-5)
        assert next(x for x in rows if x["trial"] == r["trial"])["config"] == {
            "algo.beta": float(r["algo.beta"]), "algo.expectile": float(r["algo.expectile"])}
    assert [r["mean"] for r in rows] == sorted(means.values(), reverse=True)
    assert "results.csv not found" in " ".join(_check_self_contained(rep.report(partial)).classed["na"])


# -------------------------------------------------------------------------------------------------- in a browser

def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


_COUNT_IMAGES = """<script>
window.addEventListener("load", function () {
  var all = document.images, ok = 0;
  for (var i = 0; i < all.length; i++) { if (all[i].complete && all[i].naturalWidth > 0) ok++; }
  var d = document.createElement("div"); d.id = "img-check"; d.textContent = "IMAGES " + ok + "/" + all.length;
  document.body.appendChild(d);
});
</script>"""


def _browser_check(page: Path, tmp_path: Path, images: int) -> None:
    """One Chromium run on a copy of the page with a counter script appended (the page itself has no script):
    a screenshot that is not blank, and the DOM after load, where the counter wrote how many <img> decoded."""
    from PIL import Image

    probe = tmp_path / f"{page.stem}-probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _COUNT_IMAGES + "</body>"), encoding="utf-8")
    shot = tmp_path / f"{page.stem}.png"
    proc = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000",
                     "--run-all-compositor-stages-before-draw", "--virtual-time-budget=10000", "--dump-dom",
                     probe.absolute().as_uri())
    found = re.search(r"IMAGES (\d+)/(\d+)", proc.stdout)
    assert found, (proc.stdout[-500:], proc.stderr[-2000:])
    assert (int(found.group(1)), int(found.group(2))) == (images, images)
    assert shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (3000, 1200, 3)
    colors = np.unique(img.reshape(-1, 3), axis=0)
    non_white = (img < 245).any(axis=2).mean()
    assert len(colors) > 200 and non_white > 0.02, (len(colors), non_white)


@needs_browser
def test_run_page_renders_in_chromium(full_run, tmp_path):
    page = full_run / "sub" / "page.html"  # written by test_run_page_shows_diagnostic_flags_and_ope
    if not page.exists():
        rep.report(full_run, out=page)
    _browser_check(page, tmp_path, images=5)


@needs_browser
def test_sweep_page_renders_in_chromium(sweep_dir, tmp_path):
    page = sweep_dir / "report.html"
    if not page.exists():
        rep.report(sweep_dir)
    _browser_check(page, tmp_path, images=2)
