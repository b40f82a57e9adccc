"""scripts/warm_start_probe.py: the run's warm start alone, reproduced exactly, and variants of it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "results" / "study" / "mla_only" / "seed_0"  # a committed study run (results/README.md)


def load_script():
    spec = importlib.util.spec_from_file_location("warm_start_probe", ROOT / "scripts" / "warm_start_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["warm_start_probe"] = module
    spec.loader.exec_module(module)
    return module


probe = load_script()


def test_a_variant_is_a_name_and_overrides_separated_by_semicolons():
    assert probe.parse_variant("default") == ("default", [])
    assert probe.parse_variant("wide:model.overrides={a: 1, b: 2}; trainer.sft_lr=2e-3") == (
        "wide", ["model.overrides={a: 1, b: 2}", "trainer.sft_lr=2e-3"])
    with pytest.raises(ValueError, match="give a name"):
        probe.parse_variant(":trainer.sft_lr=1")


def test_the_default_variant_reproduces_a_committed_runs_warm_start_losses(tmp_path):
    """The study's mla_only run at seed 0: the same model, data and optimizer give its first losses."""
    logged = {r["sft/step"]: r["sft/loss"] for r in map(json.loads, (RUN / "warm_start.jsonl").open())
              if "sft/loss" in r}
    out = tmp_path / "probe.json"
    assert probe.main(["--experiment", "mla_only", "--steps", "3", "--out", str(out),
                       "--variant", "default", "--variant", "no_norm:model.overrides={kv_latent_norm: false}"]) == 0
    variants = json.loads(out.read_text())["variants"]
    assert variants["default"]["losses"] == pytest.approx([logged[s] for s in (1, 2, 3)], rel=1e-5)
    assert variants["no_norm"]["overrides"] == ["model.overrides={kv_latent_norm: false}"]
    assert variants["no_norm"]["losses"][1:] != pytest.approx(variants["default"]["losses"][1:], rel=1e-3)
