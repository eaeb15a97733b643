"""Issue 6.5: a resumed run continues on the data it was trained on, or says why it cannot."""
from __future__ import annotations

import shutil

import pytest
import yaml

import rayoffline
from rayoffline.errors import ConfigError

CFG = {"batch_size": 32, "log_every": 5, "eval_episodes": 0, "checkpoint_every": 10, "threads": 1,
       "progress": "off", "algo": {"hidden": [16, 16]}}


@pytest.fixture()
def dataset(ray_cluster, tmp_path):
    from rayoffline import data
    src = data.resolve("builtin:pendulum-medium")
    copy = tmp_path / "pendulum"
    shutil.copytree(src, copy)
    return copy


def test_resume_refuses_appended_data_unless_allowed_and_records_it(dataset, tmp_path):
    from rayoffline import data
    out = tmp_path / "run"
    rayoffline.train("bc", str(dataset), out, steps=10, config=CFG)
    first_hash = yaml.safe_load((out / "config.yaml").read_text())["data_hash"]
    data.append("builtin:pendulum-random", dataset)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="has changed since .* --allow-data-change"):
        rayoffline.train(None, None, out, steps=20, resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written
    result = rayoffline.train(None, None, out, steps=20, resume=True, allow_data_change=True)
    assert result["steps"] == 20
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data_hash"] != first_hash
    assert saved["data_changes"] == [{"step": 10, "from_hash": first_hash, "to_hash": saved["data_hash"],
                                      "data": str(dataset)}]
    # the change is now the run's data: a further resume needs no flag
    assert rayoffline.train(None, None, out, steps=25, resume=True)["steps"] == 25


def test_resume_on_a_moved_dataset(dataset, tmp_path):
    out = tmp_path / "run"
    rayoffline.train("bc", str(dataset), out, steps=10, config=CFG)
    moved = tmp_path / "elsewhere"
    dataset.rename(moved)
    with pytest.raises(ConfigError, match="--resume --data NEW_PATH"):
        rayoffline.train(None, None, out, steps=20, resume=True)
    result = rayoffline.train(None, str(moved), out, steps=20, resume=True)
    assert result["steps"] == 20
    assert yaml.safe_load((out / "config.yaml").read_text())["data"] == str(moved)


def test_resume_with_data_of_other_content_is_refused(dataset, tmp_path):
    from rayoffline import data
    out = tmp_path / "run"
    rayoffline.train("bc", str(dataset), out, steps=10, config=CFG)
    other = data.resolve("builtin:pendulum-expert")
    with pytest.raises(ConfigError, match="--data .* has changed since"):
        rayoffline.train(None, str(other), out, steps=20, resume=True)


def test_train_and_resume_on_a_file_uri(dataset, tmp_path):
    out = tmp_path / "run"
    uri = f"file://{dataset}"
    rayoffline.train("bc", uri, out, steps=10, config=CFG)
    assert yaml.safe_load((out / "config.yaml").read_text())["data"] == uri  # kept as given, not made a path
    assert rayoffline.train(None, None, out, steps=20, resume=True)["steps"] == 20
