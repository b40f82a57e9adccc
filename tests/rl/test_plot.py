"""Curves from real metrics files, runs overlaid; a clear error without metrics."""

from __future__ import annotations

import pytest

from rl.plot import main, plot_runs, watch
from rl.tracking import MetricsLogger


def fake_run(path, scale: float):
    logger = MetricsLogger(path, {}, backends=(), wandb_mode="disabled")
    for step in range(1, 4):
        logger.log_warm_start(step, {"sft/loss": 1.0 / step})
    for step in range(1, 6):
        row = {"reward/mean": scale * step, "train/kl_ref": 0.01 * step, "train/lru_iterations": 2.0}
        if step % 2 == 0:
            row["eval/test/acc"] = 0.1 * step
        logger.log(step, row)


def test_one_png_per_logged_metric_with_runs_overlaid(tmp_path):
    fake_run(tmp_path / "baseline", 0.1)
    fake_run(tmp_path / "mla_lru_adaptive", 0.2)
    written = plot_runs([tmp_path / "baseline", tmp_path / "mla_lru_adaptive"], tmp_path / "curves")
    names = sorted(p.name for p in written)
    assert names == ["heldout_test_accuracy.png", "kl.png", "lru_iterations.png", "reward.png", "warm_start_loss.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_watch_redraws_as_the_run_grows_and_waits_for_a_run_with_no_rows(tmp_path, capsys):
    assert watch([tmp_path / "run"], tmp_path / "curves", every_s=0.01, count=1) == 1  # nothing logged yet
    assert "waiting" in capsys.readouterr().out
    fake_run(tmp_path / "run", 0.1)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "curves"), "--watch", "0.01", "--count", "2"]) == 0
    assert capsys.readouterr().out.count("redrew 5 curves") == 2
    assert (tmp_path / "curves" / "reward.png").read_bytes()[:4] == b"\x89PNG"


def test_no_metrics_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
