"""Curves from real metrics files, runs overlaid; a clear error without metrics."""

from __future__ import annotations

import pytest

from rl.plot import main, plot_runs
from rl.tracking import MetricsLogger


def fake_run(path, scale: float):
    logger = MetricsLogger(path, {}, wandb_mode="disabled")
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
    assert names == ["heldout_test_accuracy.png", "kl.png", "lru_iterations.png", "reward.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_no_metrics_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
