"""Data-quality report: content of the text, the numbers behind it, the PNG."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from rayoffline.data import inspect
from rayoffline.errors import DataError

from .test_load import write_dataset


@pytest.fixture
def box_ds(tmp_path):
    root = tmp_path / "box"
    cols = write_dataset(root, lengths=(50, 30, 70, 20, 40, 90), obs_dim=3, act_dim=2, files=3)
    return root, cols


def test_report_box(box_ds, tmp_path):
    root, cols = box_ds
    png = tmp_path / "out" / "report.png"
    r = inspect(root, png=png)
    text, s = r["text"], r["summary"]
    assert r["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "transitions 300   episodes 6" in text
    # rewards are the row index: episode returns are sums of consecutive ranges
    ends = np.cumsum((50, 30, 70, 20, 40, 90))
    rets = np.array([np.arange(e - n, e).sum() for e, n in zip(ends, (50, 30, 70, 20, 40, 90))], float)
    np.testing.assert_allclose(np.sort(s["returns"]), np.sort(rets))
    for q in (5, 25, 50, 75, 95):
        assert s["return_stats"][f"p{q}"] == pytest.approx(np.percentile(rets, q))
        assert f"p{q} " in text
    assert "3 terminated, 3 truncated, 0 unfinished" in text
    assert s["num_terminations"] == 3 and s["num_truncations"] == 3
    assert "Box(2)" in text and "covered" in text
    a = cols["actions"]
    for d in range(2):
        row = s["action_dims"][d]
        assert row["min"] == pytest.approx(a[:, d].min()) and row["max"] == pytest.approx(a[:, d].max())
        assert 0.9 < row["span"] <= 1.0 and row["covered"] == 1.0
    obs = cols["observations"]
    np.testing.assert_allclose(s["obs_min"], obs.min(0), rtol=1e-6)
    np.testing.assert_allclose(s["obs_max"], obs.max(0), rtol=1e-6)
    assert re.search(r"observations Box\(3\)", text)


def test_report_default_png_and_discrete(tmp_path, monkeypatch):
    root = tmp_path / "disc"
    cols = write_dataset(root, discrete_n=5, files=2, truncate_last=False)
    monkeypatch.chdir(tmp_path / "disc" / "part-00000")
    r = inspect(str(root))  # default: NAME-inspect.png in the working directory, nothing added to the dataset
    assert r["png"] == str(root / "part-00000" / "disc-inspect.png") and Path(r["png"]).exists()
    counts = np.bincount(cols["actions"], minlength=5)
    np.testing.assert_array_equal(r["summary"]["action_counts"], counts)
    assert "Discrete(5)" in r["text"]
    for i, c in enumerate(counts):
        assert re.search(rf"action {i}\s+{c}\s", r["text"])
    assert "6 terminated, 0 truncated" in r["text"]


def test_poor_coverage_and_unfinished_episodes(tmp_path):
    import pyarrow.parquet as pq

    root = tmp_path / "narrow"
    write_dataset(root, files=1)
    f = next(root.glob("part-*/*.parquet"))
    t = pq.read_table(f)
    import pyarrow as pa
    acts = np.full((t.num_rows, 2), 0.05, np.float32)
    acts[:, 0] = np.linspace(-1, 1, t.num_rows)
    trunc = t.column("truncations").to_numpy(zero_copy_only=False).copy()
    term = t.column("terminations").to_numpy(zero_copy_only=False).copy()
    trunc[-1] = term[-1] = False  # the last episode never ends
    t = (t.set_column(t.schema.get_field_index("actions"), "actions",
                      pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), 2))
         .set_column(t.schema.get_field_index("truncations"), "truncations", pa.array(trunc))
         .set_column(t.schema.get_field_index("terminations"), "terminations", pa.array(term)))
    pq.write_table(t, f)
    s = inspect(root, png=tmp_path / "n.png")["summary"]
    assert s["action_dims"][0]["covered"] == 1.0
    assert s["action_dims"][1]["covered"] == pytest.approx(1 / 20) and s["action_dims"][1]["span"] == 0
    assert s["episodes_unfinished"] == 1


def test_missing_dataset_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        inspect(tmp_path / "nothing")


def test_inspect_builtin(ray_cluster, tmp_path):
    r = inspect("builtin:cartpole-medium", png=tmp_path / "c.png")
    text = r["text"]
    assert "source      builtin:cartpole-medium   env CartPole-v1" in text
    assert "Discrete(2)" in text and "normalized  mean" in text
    s = r["summary"]
    assert s["num_transitions"] >= 20_000 and s["episodes_terminated"] + s["episodes_truncated"] == s["num_episodes"]
    assert 60 < s["return_stats"]["mean"] < 200
    assert (tmp_path / "c.png").stat().st_size > 10_000
