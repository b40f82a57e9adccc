"""`python -m data.causal_loop`: real files, real parquet readers, errors before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from data.causal_loop.__main__ import main
from data.causal_loop.dataset import write_parquet


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.causal_loop", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_documents_the_flags():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--local_dir", "--num_samples", "--levels", "--allow_duplicates", "--template"):
        assert flag in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--levels", "1,7"], "unknown level(s) [7]"),
    (["--num_samples", "-5"], "--num_samples=-5: must be >= 0"),
    (["--num_validation", "-1"], "--num_validation=-1: must be >= 0"),
    (["--num_vars", "1,2,3"], "give a range as MIN,MAX"),
    (["--op_weights", "copy=x"], "give weights as name=weight"),
    (["--heldout_steps", "1,2"], "must all exceed"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, args, message):
    out = tmp_path / "out"
    result = run_cli("--local_dir", str(out), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_unwritable_directory_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("--local_dir", str(blocker / "sub"), "--num_samples", "10")
    assert result.returncode == 2 and "not a writable directory" in result.stderr


def test_writes_verl_parquet_that_datasets_reads(tmp_path):
    out = tmp_path / "ds"
    assert main(["--local_dir", str(out), "--num_samples", "300", "--num_test", "40", "--num_heldout", "20",
                 "--levels", "1,2", "--quiet", "--seed", "3"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["dataset_info.json", "test.parquet", "test_more_steps.parquet", "test_more_vars.parquet",
                     "train.parquet"]
    import datasets  # the library verl and TRL read parquet with

    train = datasets.load_dataset("parquet", data_files=str(out / "train.parquet"), split="train")
    assert len(train) == 300
    assert set(train.column_names) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    row = train[0]
    assert row["prompt"][0]["role"] == "user" and "<answer>" in row["prompt"][0]["content"]
    assert row["extra_info"]["level"] in (1, 2) and row["extra_info"]["split"] == "train"
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["sizes"] == {"train": 300, "test": 40, "test_more_steps": 20, "test_more_vars": 20}
    assert info["task"]["levels"] == [1, 2]
    assert len(pq.read_table(out / "test_more_vars.parquet")) == 20


def test_validation_split_is_written_when_asked(tmp_path):
    out = tmp_path / "ds"
    assert main(["--local_dir", str(out), "--num_samples", "200", "--num_test", "40", "--num_heldout", "0",
                 "--num_validation", "30", "--levels", "1,2", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dataset_info.json", "test.parquet", "train.parquet",
                                                    "validation.parquet"]
    info = [row["extra_info"] for row in pq.read_table(out / "validation.parquet").to_pylist()]
    assert len(info) == 30 and {i["split"] for i in info} == {"validation"}
    keys = {name: set(pq.read_table(out / f"{name}.parquet").column("extra_info").combine_chunks().field("key")
                      .to_pylist()) for name in ("train", "test", "validation")}
    assert not keys["validation"] & keys["train"] and not keys["validation"] & keys["test"]
    assert json.loads((out / "dataset_info.json").read_text())["sizes"] == {"train": 200, "test": 40, "validation": 30}


def test_config_file_and_unknown_fields(tmp_path):
    cfg = tmp_path / "task.yaml"
    cfg.write_text("levels: [1]\nnum_steps: [1, 2]\n")
    assert main(["--local_dir", str(tmp_path / "a"), "--config", str(cfg), "--num_samples", "50", "--num_test", "5",
                 "--num_heldout", "0", "--quiet"]) == 0
    assert pq.read_table(tmp_path / "a" / "train.parquet").column("extra_info").to_pylist()[0]["level"] == 1
    cfg.write_text("levels: [1]\nnum_step: [1, 2]\n")
    with pytest.raises(SystemExit):
        main(["--local_dir", str(tmp_path / "b"), "--config", str(cfg), "--quiet"])


def test_parquet_write_is_atomic(tmp_path):
    target = tmp_path / "train.parquet"
    target.write_text("previous good file")
    with pytest.raises(AttributeError):
        write_parquet("not a table", target)  # fails inside the writer
    assert target.read_text() == "previous good file"
    assert [p.name for p in tmp_path.iterdir()] == ["train.parquet"]  # no temporary left behind


def test_written_files_are_world_readable(tmp_path):
    main(["--local_dir", str(tmp_path), "--num_samples", "20", "--num_test", "5", "--num_heldout", "0", "--quiet"])
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "train.parquet").st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600
