"""Integrity and user-facing behaviour of the data layer found by trying it as a new user (issue 6): missing
shards, file modes, duplicate appends, dropped rows, row numbers in errors, --map syntax, noise, inspect."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayoffline.cli import main
from rayoffline.data import inspect, iter_chunks, load
from rayoffline.data.metadata import write_metadata
from rayoffline.errors import DataError

from .test_load import write_dataset


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------------------------------
# item 4: files and row counts are checked against _rayoffline.json

@pytest.fixture
def ds(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, files=4)
    return root


def test_missing_shard_is_named_by_load_iter_chunks_and_inspect(ds, tmp_path, capsys):
    (ds / "part-00000" / "shard-00002.parquet").unlink()
    want = r"1 of 4 Parquet file\(s\) listed in _rayoffline.json are missing: part-00000/shard-00002.parquet"
    with pytest.raises(DataError, match=want):
        load(ds)
    with pytest.raises(DataError, match=want):
        load(ds, rank=1, world_size=2)  # a rank whose own files are all there still refuses
    with pytest.raises(DataError, match=want):
        next(iter_chunks(ds))
    with pytest.raises(DataError, match=want):
        inspect(ds, out=tmp_path)
    assert main(["data", "inspect", str(ds), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayoffline: error: ") and "shard-00002.parquet" in err and err.count("\n") == 1


def test_row_counts_must_match_metadata(ds):
    f = ds / "part-00000" / "shard-00001.parquet"
    pq.write_table(pq.read_table(f).slice(0, 10), f)  # a shard replaced by a shorter one
    with pytest.raises(DataError, match=r"hold \d+ rows but _rayoffline.json says partition 'part-00000' has 300"):
        load(ds)
    meta = json.loads((ds / "_rayoffline.json").read_text())
    meta["partitions"][0].pop("num_transitions")  # no per-partition count: the total still catches it
    (ds / "_rayoffline.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"num_transitions is 300"):
        load(ds)


def test_files_metadata_does_not_list_are_not_part_of_the_dataset(ds):
    """A partition an append is still writing (renamed into place, _rayoffline.json not yet replaced)."""
    extra = ds / "part-00001"
    extra.mkdir()
    pq.write_table(pq.read_table(ds / "part-00000" / "shard-00000.parquet"), extra / "shard-00000.parquet")
    assert len(load(ds).rewards) == 300


# ---------------------------------------------------------------------------------------------------------
# item 14: _rayoffline.json gets the same mode as the shards (0666 minus the umask)

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_metadata_mode_follows_umask_like_parquet(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_metadata(tmp_path, {"x": 1})
        pq.write_table(pa.table({"a": [1]}), tmp_path / "shard.parquet")
    finally:
        os.umask(old)
    assert mode(tmp_path / "_rayoffline.json") == mode(tmp_path / "shard.parquet") == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_rayoffline.json", "shard.parquet"]


# ---------------------------------------------------------------------------------------------------------
# item 8: --map takes an explicit column list

def test_parse_mapping_column_lists():
    from rayoffline.cli import _parse_mapping
    from rayoffline.errors import RayOfflineError

    assert _parse_mapping(["observations=x*,actions=a", "rewards=r"]) == {
        "observations": "x*", "actions": "a", "rewards": "r"}  # the old syntax is unchanged
    assert _parse_mapping(["observations=obs_0,obs_1,obs_2"]) == {"observations": ["obs_0", "obs_1", "obs_2"]}
    assert _parse_mapping(["observations=o2, o0 ,actions=a0,a1,rewards=r"]) == {
        "observations": ["o2", "o0"], "actions": ["a0", "a1"], "rewards": "r"}
    with pytest.raises(RayOfflineError, match="expected FIELD=COLUMN before 'obs_1'"):
        _parse_mapping(["obs_1,observations=x"])
    with pytest.raises(RayOfflineError, match="field 'rewards' is mapped twice"):
        _parse_mapping(["rewards=r", "rewards=s"])


def csv_source(path: Path, n: int = 20, nan_line: int | None = None, text: str = "nan") -> Path:
    """A CSV with obs_0..obs_2, act, rew, done, ep: 2 episodes of n // 2 rows, the first terminated."""
    rng = np.random.default_rng(0)
    lines = ["obs_0,obs_1,obs_2,act,rew,done,ep"]
    for i in range(n):
        o = rng.standard_normal(3)
        lines.append(f"{o[0]:.5f},{o[1]:.5f},{o[2]:.5f},{rng.uniform(-1, 1):.5f},{rng.standard_normal():.5f},"
                     f"{int(i == n // 2 - 1)},{i // (n // 2)}")
    if nan_line is not None:  # file line numbers: the header is line 1
        cells = lines[nan_line - 1].split(",")
        cells[1] = text
        lines[nan_line - 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_map_explicit_column_list_converts_in_given_order(tmp_path):
    src = csv_source(tmp_path / "log.csv")
    out = tmp_path / "out"
    assert main(["data", "convert", str(src), "--out", str(out), "--shards", "1",
                 "--map", "observations=obs_2,obs_0,obs_1,actions=act,rewards=rew,terminations=done,episode_id=ep"]) == 0
    import pyarrow.csv as pcsv
    t = pcsv.read_csv(src)
    obs = np.stack([t.column(c).to_numpy() for c in ("obs_2", "obs_0", "obs_1")], 1).astype(np.float32)
    got = load(out).observations.numpy()
    np.testing.assert_array_equal(got[:10], obs[:10])  # the terminated episode keeps every row


def test_map_column_list_errors(tmp_path, capsys):
    src = csv_source(tmp_path / "log.csv")
    base = "actions=act,rewards=rew,terminations=done"
    assert main(["data", "convert", str(src), "--out", str(tmp_path / "o"), "--map", f"observations=obs_0,obs_9,{base}"]) == 2
    err = capsys.readouterr().err
    assert "column(s) 'obs_9' (mapped to observations) not found" in err and str(src) in err
    assert main(["data", "convert", str(src), "--out", str(tmp_path / "o"),
                 "--map", f"observations=obs_*,actions=act,rewards=rew,act,terminations=done"]) == 2
    assert "rewards takes one column" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------
# item 7: dropped rows are reported; CSV errors name file lines, Parquet errors 0-based rows; NaN is not null

CSV_MAP = "observations=obs_*,actions=act,rewards=rew,terminations=done,episode_id=ep"


def test_rows_dropped_without_next_observations_are_reported(tmp_path, capsys):
    from rayoffline.data import convert, read_metadata
    from rayoffline.errors import DataWarning

    src = csv_source(tmp_path / "log.csv", n=20)  # episode 0 terminates, episode 1 ends without a flag
    mapping = dict(kv.split("=") for kv in CSV_MAP.split(","))
    with pytest.warns(DataWarning, match=r"dropped 1 of 20 rows: without a next-observation column") as rec:
        meta = convert(str(src), tmp_path / "a", shards=1, mapping=mapping)
    assert len(rec) == 1 and meta["num_transitions"] == 19
    assert read_metadata(tmp_path / "a")["partitions"][0]["notes"] == [str(rec[0].message)]

    capsys.readouterr()
    assert main(["data", "convert", str(src), "--out", str(tmp_path / "b"), "--shards", "1", "--map", CSV_MAP]) == 0
    out, err = capsys.readouterr()
    assert out == f"wrote 19 transitions in 2 episodes to {tmp_path / 'b'}\n"
    assert err.startswith("rayoffline: warning: ") and err.count("\n") == 1
    assert "dropped 1 of 20 rows" in err and "(0 truncated, 1 without either flag)" in err
    assert "Map next_observations=COLUMN" in err

    # with next observations nothing is dropped and nothing is said
    import pyarrow.csv as pcsv
    t = pcsv.read_csv(src)
    full = tmp_path / "full.parquet"
    pq.write_table(t.append_column("nx", t.column("obs_0")).append_column("ny", t.column("obs_1"))
                   .append_column("nz", t.column("obs_2")), full)
    assert main(["data", "convert", str(full), "--out", str(tmp_path / "c"), "--shards", "1", "--map",
                 CSV_MAP + ",next_observations=nx,ny,nz"]) == 0
    out, err = capsys.readouterr()
    assert "wrote 20 transitions" in out and err == ""
    assert read_metadata(tmp_path / "c")["partitions"][0]["notes"] == []


@pytest.mark.parametrize("text,what", [("nan", "holds NaN (not a number) at line 39"),
                                       ("-nan", "holds NaN (not a number) at line 39"),
                                       ("inf", "holds +inf at line 39"),
                                       ("", "is empty (null: an empty field or NA/NULL/#N/A) at line 39"),
                                       ("NA", "is empty (null: an empty field or NA/NULL/#N/A) at line 39")])
def test_csv_errors_name_the_file_line(tmp_path, capsys, text, what):
    src = csv_source(tmp_path / "log.csv", n=50, nan_line=39, text=text)
    assert main(["data", "convert", str(src), "--out", str(tmp_path / "o"), "--map", CSV_MAP]) == 2
    err = capsys.readouterr().err
    assert f"{src}: column 'obs_1' {what}" in err, err
    assert "row" not in err.split(what)[0].split(str(src))[1]  # says line, not row
    assert not (tmp_path / "o").exists()


def test_csv_line_numbers_count_blank_lines_and_quoted_newlines(tmp_path, capsys):
    src = tmp_path / "log.csv"
    src.write_text('o,p,a,r,d,note\n0.1,0.2,0.5,1,0,"two\nlines"\n\n0.2,0.3,0.5,nan,1,x\n')  # row 1: line 5
    assert main(["data", "convert", str(src), "--out", str(tmp_path / "o"),
                 "--map", "observations=o,p,actions=a,rewards=r,terminations=d"]) == 2
    assert "column 'r' holds NaN (not a number) at line 5" in capsys.readouterr().err


def test_parquet_errors_say_rows_are_0_based(tmp_path, capsys):
    import pyarrow.csv as pcsv
    t = pcsv.read_csv(csv_source(tmp_path / "log.csv", n=50, nan_line=39))  # Arrow reads nan as null
    i = t.schema.get_field_index("obs_1")
    t = t.set_column(i, "obs_1", pa.array(t.column(i).to_numpy(zero_copy_only=False)))  # a float NaN, not null
    pq.write_table(t, tmp_path / "log.parquet")
    assert main(["data", "convert", str(tmp_path / "log.parquet"), "--out", str(tmp_path / "o"), "--map", CSV_MAP]) == 2
    assert "column 'obs_1' holds NaN (not a number) at row 37 (0-based)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# item 6: appending the same content twice is refused unless allowed; append --shards; shards by size

def digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_duplicate_append_refused_unless_allowed(tmp_path, capsys):
    from rayoffline.data import append, read_metadata

    a = csv_source(tmp_path / "a.csv", n=20)
    ds = tmp_path / "ds"
    assert main(["data", "convert", str(a), "--out", str(ds), "--map", CSV_MAP]) == 0
    b = tmp_path / "b.csv"
    b.write_text(a.read_text())  # the same rows under another name
    before = digest(ds)
    capsys.readouterr()
    assert main(["data", "append", str(b), "--to", str(ds), "--map", CSV_MAP]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayoffline: error: ") and err.count("\n") == 1
    assert f"csv:{b}" in err and "already in" in err and "part-00000" in err and "--allow-duplicate" in err
    with pytest.raises(DataError, match="allow_duplicate=True"):
        append(str(b), ds, mapping=dict(kv.split("=") for kv in CSV_MAP.split(",")))
    assert digest(ds) == before  # nothing written

    assert main(["data", "append", str(b), "--to", str(ds), "--map", CSV_MAP, "--allow-duplicate",
                 "--shards", "3"]) == 0
    meta = read_metadata(ds)
    part = meta["partitions"][1]
    assert part["duplicate_of"] == "part-00000" and part["content_hash"] == meta["partitions"][0]["content_hash"]
    assert part["files"] == [f"shard-{i:05d}.parquet" for i in range(3)]
    assert "duplicate_of" not in meta["partitions"][0]
    assert meta["num_transitions"] == 38 and meta["num_episodes"] == 4
    r = load(ds).rewards.numpy()
    np.testing.assert_array_equal(r[19:], r[:19])  # the same transitions twice, as asked

    # different content is appended without a flag, one file by default for a small source
    c = csv_source(tmp_path / "c.csv", n=12)
    assert main(["data", "append", str(c), "--to", str(ds), "--map", CSV_MAP]) == 0
    assert read_metadata(ds)["partitions"][2]["files"] == ["shard-00000.parquet"]


def test_default_shards_by_size(tmp_path, monkeypatch):
    import importlib

    from rayoffline.data import convert
    from rayoffline.errors import DataWarning

    conv = importlib.import_module("rayoffline.data.convert")  # the module (rayoffline.data.convert is the function)
    src = csv_source(tmp_path / "a.csv", n=100)
    mapping = dict(kv.split("=") for kv in CSV_MAP.split(","))
    with pytest.warns(DataWarning):  # the last row of episode 1 is dropped
        meta = convert(str(src), tmp_path / "one", mapping=mapping)
    assert meta["partitions"][0]["files"] == ["shard-00000.parquet"]  # 100 rows: one file
    monkeypatch.setattr(conv, "SHARD_BYTES", 1 << 10)  # ~5 KiB of columns -> 5 files; never more than 8
    with pytest.warns(DataWarning):  # the last row of episode 1 is dropped
        assert len(convert(str(src), tmp_path / "five", mapping=mapping)["partitions"][0]["files"]) == 5
    monkeypatch.setattr(conv, "SHARD_BYTES", 1)
    with pytest.warns(DataWarning):  # the last row of episode 1 is dropped
        assert len(convert(str(src), tmp_path / "eight", mapping=mapping)["partitions"][0]["files"]) == 8


# ---------------------------------------------------------------------------------------------------------
# item 13: inspect writes where asked (default: the working directory); integer counts, action units, panels

def test_inspect_builtin_writes_to_the_working_directory(ray_cluster, tmp_path, monkeypatch, capsys):
    from rayoffline.data.builtin import cache_root

    monkeypatch.chdir(tmp_path)
    assert main(["data", "inspect", "builtin:cartpole-medium"]) == 0
    out = capsys.readouterr().out
    png = tmp_path / "cartpole-medium-inspect.png"
    assert out.rstrip().endswith(f"plot: {png}") and png.read_bytes()[:4] == b"\x89PNG"
    assert not list(cache_root().rglob("*.png"))  # nothing written into the cache
    assert main(["data", "inspect", "builtin:cartpole-medium", "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "cartpole-medium-inspect.png").exists()
    assert main(["data", "inspect", "builtin:cartpole-medium", "--png", str(tmp_path / "c.png")]) == 0  # alias
    assert capsys.readouterr().out.rstrip().endswith(f"plot: {tmp_path / 'c.png'}")


def is_integer_ticks(axis) -> bool:
    lo, hi = axis.get_view_interval()
    ticks = [t for t in axis.get_majorticklocs() if lo <= t <= hi]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def test_figure_integer_counts_constant_lengths_action_units_and_panels(tmp_path):
    from rayoffline.data.inspect import figure, summarize

    root = tmp_path / "const"
    write_dataset(root, lengths=(200,) * 7, obs_dim=3, act_dim=2)  # every episode 200 steps
    meta = json.loads((root / "_rayoffline.json").read_text())
    meta["action_space"].update(low=[-2.0, -1.0], high=[2.0, 1.0])
    (root / "_rayoffline.json").write_text(json.dumps(meta))
    fig = figure(summarize(root), "t")
    fig.canvas.draw()
    titles = {ax.get_title(): ax for ax in fig.axes}
    returns = next(ax for t, ax in titles.items() if t.startswith("returns"))
    lengths = next(ax for t, ax in titles.items() if t.startswith("lengths"))
    rewards = next(ax for t, ax in titles.items() if t.startswith("rewards"))
    actions = next(ax for t, ax in titles.items() if t.startswith("action coverage"))
    obs = next(ax for t, ax in titles.items() if t.startswith("observations"))
    for ax in (returns, lengths, rewards):
        assert is_integer_ticks(ax.yaxis), ax.get_title()  # counts: no 0.5 episodes
    assert lengths.get_title() == "lengths: all 7 episodes have 200 steps"
    lo, hi = lengths.get_xlim()
    assert lo <= 195 and hi >= 205 and is_integer_ticks(lengths.xaxis)  # not 199.6..200.4
    lo, hi = actions.get_xlim()
    assert lo < -2.0 and hi > 2.0 and hi - lo < 5  # action units with room for the bounds, not [0, 1]
    assert obs.get_xlim()[1] > 2 and len(obs.collections) >= 1  # a mark per observation dimension


# ---------------------------------------------------------------------------------------------------------
# item 15: small partitions are written without starting Ray, by the same writer, into the same files

def test_ray_and_in_process_writes_make_the_same_files(ray_cluster, tmp_path, monkeypatch):
    import importlib

    from rayoffline.data import convert

    conv = importlib.import_module("rayoffline.data.convert")  # the module (rayoffline.data.convert is the function)
    src = tmp_path / "log.parquet"
    import pyarrow.csv as pcsv
    t = pcsv.read_csv(csv_source(tmp_path / "log.csv", n=40))
    pq.write_table(t.append_column("nx", t.column("obs_0")).append_column("ny", t.column("obs_1"))
                   .append_column("nz", t.column("obs_2")), src)
    mapping = {"observations": "obs_*", "actions": "act", "rewards": "rew", "terminations": "done",
               "episode_id": "ep", "next_observations": ["nx", "ny", "nz"]}
    calls = []
    real = conv._run_on_ray
    monkeypatch.setattr(conv, "_run_on_ray", lambda *a: (calls.append(1), real(*a))[1])
    convert(str(src), tmp_path / "local", shards=3, mapping=mapping)
    assert calls == []  # 40 rows: no Ray
    monkeypatch.setattr(conv, "LOCAL_WRITE_MAX_BYTES", 0)
    convert(str(src), tmp_path / "ray", shards=3, mapping=mapping)
    assert calls == [1]
    assert digest(tmp_path / "local") == digest(tmp_path / "ray")  # byte for byte, _rayoffline.json included
    assert sorted(digest(tmp_path / "ray")) == ["_rayoffline.json"] + [f"part-00000/shard-0000{i}.parquet" for i in range(3)]
    for root in ("local", "ray"):
        assert len({mode(p) for p in (tmp_path / root).rglob("*") if p.is_file()}) == 1  # one mode for all files


def test_small_convert_in_a_subprocess_does_not_start_ray(tmp_path):
    import subprocess
    import sys

    src = csv_source(tmp_path / "log.csv", n=100)
    code = ("import sys; from rayoffline.cli import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "data", "convert", str(src), "--out", str(tmp_path / "o"),
                        "--map", CSV_MAP], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote 99 transitions in 2 episodes to {tmp_path / 'o'}\n"
    assert len(load(tmp_path / "o").rewards) == 99


def test_data_fields_match_batch():
    from rayoffline.batch import FIELDS
    from rayoffline.data.load import FIELDS as DATA_FIELDS

    assert DATA_FIELDS == FIELDS


# ---------------------------------------------------------------------------------------------------------
# item 12: a conversion through Ray says nothing about Ray on the terminal

def test_convert_through_ray_prints_no_ray_notices(tmp_path):
    import subprocess
    import sys

    src = csv_source(tmp_path / "log.csv", n=40)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a user's shell: no RAY_AUTH_MODE
    env.update(RAYOFFLINE_LOCAL_WRITE_MAX_BYTES="0",  # through Ray Data even though the data is small
               HOME=str(tmp_path))  # Ray keeps its auth token under ~/.ray: not in the real home
    r = subprocess.run([sys.executable, "-m", "rayoffline", "data", "convert", str(src), "--out", str(tmp_path / "o"),
                        "--shards", "2", "--map", CSV_MAP + ",next_observations=obs_*"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote 40 transitions in 2 episodes to {tmp_path / 'o'}\n"
    assert r.stderr == ""  # no token-auth notice, no "Progress bars disabled", no Ray Data progress lines
    assert len(load(tmp_path / "o").rewards) == 40
