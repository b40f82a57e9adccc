"""scripts/run_ablation.py: the dry-run table, collecting finished runs for the study report, and (slow) real tiny
runs through Ray: two experiments finish, a broken one is reported while they run, a re-run skips them."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import models
from models import param_count
from rl.experiments import load_experiments, retrofit_preview

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_ablation.py"
TINY = ["trainer.sft_steps=2", "trainer.steps=1", "data.eval_size=2", "rollout.max_new_tokens=8",
        "trainer.prompts_per_step=2", "rollout.n=2", "trainer.sft_batch_size=4", "trainer.minibatch_size=4",
        "trainer.micro_batch_size=4", "logging.progress=false", "logging.backends=[]", "logging.wandb_mode=disabled",
        "logging.sample_every=0"]


def load_script():
    spec = importlib.util.spec_from_file_location("run_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_ablation"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


ablation = load_script()


def test_dry_run_lists_every_experiment(capsys):
    names = list(load_experiments())
    assert ablation.main(["--dry-run"]) == 0
    table = capsys.readouterr().out
    assert table.startswith(f"base preset: {ablation.ROOT / 'rl/presets/tiny.yaml'}\n")
    listed = [line.split()[0] for line in table.splitlines()[3:] if line.strip() and not line.startswith("cache")]
    assert listed == names
    if "looped" not in models.GROUPS:
        assert "not available: group looped does not exist yet" in table
    assert ablation.main(["--dry-run", "--json", "--experiments", "mla_lru_iter_8", "baseline_matched"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["mla_lru_iter_8", "baseline_matched"]
    assert rows[0]["iterations"] == 8 and rows[0]["parameters"] > 0 and rows[1]["model_class"] == "Qwen2ForCausalLM"
    assert rows[0]["cache_bytes_per_token"] == 4 * (64 + 16) * 4  # layers x (C + rotary key) x fp32 bytes


def test_bad_input_is_refused_before_any_run(tmp_path, capsys):
    assert ablation.main(["--experiments", "nope", "--output-dir", str(tmp_path)]) == 2
    assert "unknown experiment(s) ['nope']" in capsys.readouterr().err
    assert ablation.main(["--dry-run", "trainer.stepz=1"]) == 2
    assert "trainer.stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablation.parse_args(["--json"])
    assert not list(tmp_path.iterdir())


# ---- collecting runs for the report -----------------------------------------------------------------------

def fake_run(root: Path, experiment: str, seed: int, test_acc: list[float], passed: bool | None = True,
             wall: float | None = 60.0) -> Path:
    """A finished run directory as the driver and this script leave it."""
    run_dir = root / experiment / f"seed_{seed}"
    (run_dir / "evals").mkdir(parents=True)
    summary = {"steps": 2, "lru_iterations_mean": 2.5 if "lru" in experiment else None,
               "warm_start_loss_last": 0.12, "heldout_before_ppo": {"test/acc": 0.5, "validation/acc": 0.25}}
    if passed is not None:
        summary["warm_start_passed"] = passed
    (run_dir / "summary.json").write_text(json.dumps(summary))
    n = len(test_acc)
    test = {"acc": test_acc, "key": [100 + i for i in range(n)], "num_steps": [1 + i % 2 for i in range(n)]}
    more = {"acc": [1.0, 0.0], "key": [7, 8], "num_steps": [3, 3]}
    (run_dir / "evals" / "step_000000.json").write_text(json.dumps({"test": {**test, "acc": [0.0] * n}}))
    (run_dir / "evals" / "step_000002.json").write_text(json.dumps({"test": test, "test_more_steps": more}))
    (run_dir / "evals" / "step_000003.json").write_text(json.dumps({"validation": {"acc": [1.0], "key": [1],
                                                                                   "num_steps": [1]}}))
    if wall is not None:
        (run_dir / "ablation_run.json").write_text(json.dumps({"wall_s": wall, "returncode": 0}))
    return run_dir


def test_run_records_come_from_the_last_test_evaluation(tmp_path):
    run_dir = fake_run(tmp_path, "mla_lru_fixed", 3, [1.0, 0.0, 1.0, 1.0], passed=None, wall=None)
    run, problems, notes = ablation.run_record(run_dir, "mla_lru_fixed", 3)
    # step 2's test split (step 3 holds validation only): 3 of 4 right; steps 1: [1, 1], 2: [0, 1], 3: [1, 0]
    assert run["metrics"] == {"acc": 0.75, "acc_by_steps": {"1": 1.0, "2": 0.5, "3": 0.5}, "iterations_mean": 2.5,
                              "wall_s": None, "warm_start_loss": 0.12, "acc_before_ppo": 0.5,
                              "iterations_by_steps": None, "iterations_steps_rho": None}  # no lru_iterations kept
    assert run["passed_warm_start"] is True
    assert any("no warm_start_passed" in n for n in notes) and any("wall_s n/a" in n for n in notes)
    assert problems[1] == {"experiment": "mla_lru_fixed", "seed": 3, "problem_key": 101, "correct": 0.0,
                           "num_steps": 2}
    assert len(problems) == 4  # the test split only


def test_iterations_against_steps_by_hand():
    records = {"test": {"num_steps": [2, 2, 3], "lru_iterations": [1.0, 2.0, 3.0], "acc": [1.0, 0.0, 0.0]},
               "test_more_steps": {"num_steps": [3], "lru_iterations": [4.0], "acc": [1.0]},
               "test_more_vars": {"num_steps": [9], "lru_iterations": [0.0], "acc": [0.0]}}  # not a step split
    assert ablation.by_steps(records, "lru_iterations") == {"2": 1.5, "3": 3.5}
    assert ablation.by_steps(records) == {"2": 0.5, "3": 0.5}
    # Spearman = Pearson on ranks. steps 2,2,3,3 -> ranks 1.5,1.5,3.5,3.5 (deviations -1,-1,1,1); iterations
    # 1..4 -> ranks 1..4 (deviations -1.5,-0.5,0.5,1.5): 4 / sqrt(4 * 5) = 0.894427
    assert ablation.iterations_steps_rho(records) == pytest.approx(4 / 20 ** 0.5)
    fixed = {"test": {**records["test"], "lru_iterations": [4.0] * 3}, "test_more_steps": records["test_more_steps"]
             | {"lru_iterations": [4.0]}}
    assert ablation.iterations_steps_rho(fixed) is None  # iterations never vary: no rank correlation
    assert ablation.iterations_steps_rho({"test": {"num_steps": [2], "acc": [1.0]}}) is None  # none recorded


def test_report_only_writes_the_study_report(tmp_path, capsys):
    for seed, (a, b) in enumerate([(0.75, 0.5), (1.0, 0.25), (0.5, 0.5)]):
        fake_run(tmp_path, "mla_lru_adaptive", seed, [1.0] * int(a * 4) + [0.0] * (4 - int(a * 4)))
        fake_run(tmp_path, "mla_only", seed, [1.0] * int(b * 4) + [0.0] * (4 - int(b * 4)), passed=seed != 2)
    (tmp_path / "mla_only" / "seed_9").mkdir()  # unfinished: no summary.json
    assert ablation.main(["--report-only", "--results-dir", str(tmp_path), "--latex"]) == 0
    study = json.loads((tmp_path / "report.json").read_text())
    rows = {r["experiment"]: r for r in study["experiments"]}
    assert rows["mla_lru_adaptive"]["seeds"] == [0, 1, 2] and rows["mla_only"]["seeds"] == [0, 1]
    assert rows["mla_lru_adaptive"]["acc"]["estimate"] == pytest.approx(0.75)
    assert study["excluded"] == [{"experiment": "mla_only", "seed": 2,
                                  "reason": "did not pass the warm start (passed_warm_start=False)"}]
    assert study["collection_notes"] == ["mla_only seed 9: not finished (no summary.json): left out"]
    assert "## Collection notes" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.tex").is_file() and (tmp_path / "figures" / "acc_vs_steps.png").is_file()


def test_export_keeps_what_the_report_and_a_rerun_rest_on(tmp_path, capsys):
    runs, dest = tmp_path / "runs", tmp_path / "committed"
    for seed in (0, 1):
        run_dir = fake_run(runs, "mla_lru_adaptive", seed, [1.0, 0.0])
        (run_dir / "config.yaml").write_text(f"trainer: {{seed: {seed}}}\n")
        (run_dir / "checkpoints" / "step_000000").mkdir(parents=True)
        records = json.loads((run_dir / "evals" / "step_000002.json").read_text())
        records["test"]["response"] = ["<answer>A=1</answer>", "x"]
        (run_dir / "evals" / "step_000002.json").write_text(json.dumps(records))
    (runs / "mla_only" / "seed_0").mkdir(parents=True)  # unfinished: not copied
    assert ablation.main(["--report-only", "--results-dir", str(runs), "--export", str(dest)]) == 0
    assert "exported 2 runs" in capsys.readouterr().out
    copied = dest / "mla_lru_adaptive" / "seed_1"
    assert (copied / "summary.json").is_file() and (copied / "config.yaml").is_file()
    assert not (copied / "checkpoints").exists() and not (dest / "mla_only").exists()
    slim = json.loads((copied / "evals" / "step_000002.json").read_text())
    assert "response" not in slim["test"] and slim["test"]["acc"] == [1.0, 0.0]
    assert (dest / "report.json").is_file()
    # the committed copy rebuilds the same report
    before = json.loads((dest / "report.json").read_text())["experiments"]
    assert ablation.main(["--report-only", "--results-dir", str(dest)]) == 0
    assert json.loads((dest / "report.json").read_text())["experiments"] == before
    with pytest.raises(SystemExit):
        ablation.parse_args(["--export", str(dest)])


def test_report_only_without_runs_says_so(tmp_path, capsys):
    assert ablation.main(["--report-only", "--results-dir", str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().out


# ---- skipping, conflicts, progress ------------------------------------------------------------------------

def spec_for(tmp_path, experiment="mla_only", seed=0):
    experiments = load_experiments(extra=TINY)
    return ablation.plan_runs([experiments[experiment]], [seed], tmp_path)[0]


def test_finished_runs_are_skipped_and_other_configs_refused(tmp_path):
    spec = spec_for(tmp_path)
    assert spec.run_dir == str(tmp_path.resolve() / "mla_only" / "seed_0")
    assert spec.command[-3:] == ("trainer.seed=0", "data.seed=0", f"logging.run_dir={spec.run_dir}")
    assert ablation.prior_state(spec) == ("run", "")
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True)
    stored = json.loads(json.dumps(spec.config))
    (run_dir / "config.yaml").write_text(json.dumps(stored))
    (run_dir / "summary.json").write_text(json.dumps({"steps": 0}))
    assert ablation.prior_state(spec)[0] == "run"  # fewer steps than asked: the driver extends it
    (run_dir / "summary.json").write_text(json.dumps({"steps": 1}))
    assert ablation.prior_state(spec)[0] == "skipped"
    stored["trainer"]["lr"] = 0.5
    stored["logging"]["progress"] = True  # logging does not change what is trained
    (run_dir / "config.yaml").write_text(json.dumps(stored))
    state, why = ablation.prior_state(spec)
    assert state == "conflict" and "(trainer.lr)" in why


def test_progress_line_names_the_run_its_step_and_the_time_left(tmp_path):
    spec = spec_for(tmp_path)
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True)
    assert ablation.progress_line([spec], [], 2, [], since=0.0).endswith("waiting to start | time left unknown until "
                                                                        "a run finishes")
    started = 1.0e9
    (run_dir / "ablation_running.json").write_text(json.dumps({"started": started}))
    (run_dir / "warm_start.jsonl").write_text('{"sft/step": 1}\n{"sft/step": 2}\n')
    assert "mla_only seed 0: warm start 2/2" in ablation.progress_line([spec], [], 2, [], since=0.0)
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    line = ablation.progress_line([spec], [{"status": "finished"}], 2, [90.0], since=0.0, now=started + 30)
    assert "[ablation] 1/2 done (0 failed) | mla_only seed 0: PPO step 0/1 (0m30s)" in line
    assert line.endswith("~1m00s left")  # mean 90 s, 30 s of it spent
    # 2 runs going, 3 queued, mean 100 s: (100 - 40) + (100 - 80) + 3 x 100 = 380 s of work over 2 at once
    assert ablation.time_left([100.0], [40.0, 80.0], 3) == "~3m10s left"


def test_error_line_picks_what_went_wrong():
    tail = ["step 0", "Traceback (most recent call last):", '  File "x.py"', "FileNotFoundError: /a/b.parquet", ""]
    assert ablation.error_line(tail) == "FileNotFoundError: /a/b.parquet"
    assert ablation.error_line(["just output"]) == "just output"


# ---- real runs --------------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def final_rows(stdout: str) -> dict[str, str]:
    """{experiment: its line} of the final table (header: experiment, seed, status, ...)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("experiment ") and " status " in line)
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("["):
            break
        rows.append(line)
    return {line.split()[0]: line for line in rows}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_real_runs_finish_a_failure_is_reported_and_a_rerun_skips(tmp_path):
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(
        "experiments:\n"
        "  mla_only: {description: MLA without the LRU, group: mla_only}\n"
        "  broken:\n"
        "    description: trains on a file that does not exist (valid config; fails when the run starts)\n"
        "    group: mla_only\n"
        "    overrides: [data.source=parquet, 'data.train_files=[/nonexistent/train.parquet]']\n"
        "  mla_lru_adaptive: {description: main, group: mla_lru_adaptive,\n"
        "                     overrides: ['model.overrides={lru_global_halting: 0.5}']}\n")
    out = tmp_path / "out"
    first = run_cli("--experiments-file", str(experiments), "--output-dir", str(out), "--poll", "5", *TINY)
    assert first.returncode == 1, first.stdout + first.stderr  # the broken run failed; the others went on
    lines = final_rows(first.stdout)
    assert " finished " in lines["mla_only"] and " finished " in lines["mla_lru_adaptive"]
    assert " failed " in lines["broken"] and "train.parquet" in lines["broken"]
    assert "[ablation] 1/3 done" in first.stdout and "left" in first.stdout  # progress lines
    for name in ("mla_only", "mla_lru_adaptive"):
        assert (out / name / "seed_0" / "summary.json").is_file()
        assert json.loads((out / name / "seed_0" / "ablation_run.json").read_text())["wall_s"] > 0
    assert "train.parquet" in (out / "broken" / "seed_0" / "driver.log").read_text()  # its log is kept
    manifest = json.loads((out / "ablation_manifest.json").read_text())
    assert manifest["experiments"] == ["mla_only", "broken", "mla_lru_adaptive"] and manifest["seeds"] == [0]
    assert manifest["git_commit"] and "--output-dir" in manifest["command"]
    assert json.loads((out / "report.json").read_text())["experiments"][0]["experiment"] == "mla_lru_adaptive"

    again = run_cli("--experiments-file", str(experiments), "--experiments", "mla_only", "mla_lru_adaptive",
                    "--output-dir", str(out), "--local", *TINY)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "to run: 0, finished before: 2, conflicting: 0" in again.stdout
    assert again.stdout.count(" skipped ") == 2

    (out / "report.md").unlink()
    assert run_cli("--report-only", "--results-dir", str(out)).returncode == 0
    assert "mla_lru_adaptive" in (out / "report.md").read_text()
    assert "broken seed 0: not finished" in (out / "report.md").read_text()


# ---- the retrofit arm -------------------------------------------------------------------------------------

RETROFITS = ["retrofit_baseline", "retrofit_mla_only", "retrofit_mla_lru_fixed", "retrofit_mla_lru_adaptive"]


def test_retrofit_runs_start_from_their_source_step0_checkpoint_after_it(tmp_path):
    experiments = load_experiments(extra=TINY)
    chosen = [experiments[n] for n in ["retrofit_mla_lru_adaptive", "baseline", "retrofit_mla_only"]]
    specs = ablation.plan_runs(chosen, [0, 1], tmp_path)
    # Within each seed the source first, the retrofits after it in the order given.
    assert [(s.experiment, s.seed) for s in specs] == [
        ("baseline", 0), ("retrofit_mla_lru_adaptive", 0), ("retrofit_mla_only", 0),
        ("baseline", 1), ("retrofit_mla_lru_adaptive", 1), ("retrofit_mla_only", 1)]
    for spec in specs:
        policy = tmp_path.resolve() / "baseline" / f"seed_{spec.seed}" / "checkpoints" / "step_000000" / "policy"
        if spec.experiment == "baseline":
            assert spec.source is None and spec.config["model"]["path"] is None
            continue
        assert spec.source == "baseline" and spec.source_policy == str(policy)
        assert spec.config["model"]["path"] == str(policy) and f"model.path={policy}" in spec.command
        assert spec.sft_steps == 2  # TINY's warm start, after the experiment's 200-step recovery
    assert specs[1].config["model"]["overrides"] == {"lru_global_halting": 0.5}


def test_a_retrofit_without_its_source_checkpoint_fails_without_starting(tmp_path, capsys):
    code = ablation.main(["--experiments", "retrofit_mla_only", "--seeds", "3", "--output-dir", str(tmp_path),
                          "--local", *TINY])
    out = capsys.readouterr().out
    assert code == 1
    why = "source run baseline seed 3 has no step-0 checkpoint: run baseline first"
    assert why in out and "sources missing: 1" in out
    run_dir = tmp_path / "retrofit_mla_only" / "seed_3"
    assert json.loads((run_dir / "ablation_run.json").read_text())["error"] == why
    assert not (run_dir / "driver.log").exists()  # the driver never started
    assert ablation.blocked(spec_for(tmp_path, "retrofit_mla_only", 3), {("baseline", 3): "run"}) is None
    assert "conflicts" in ablation.blocked(spec_for(tmp_path, "retrofit_mla_only", 3), {("baseline", 3): "conflict"})
    complete = tmp_path / "baseline" / "seed_3" / "checkpoints" / "step_000000"
    complete.mkdir(parents=True)
    (complete / "COMPLETE").write_text("0")  # a source run of an earlier invocation: its checkpoint suffices
    assert ablation.blocked(spec_for(tmp_path, "retrofit_mla_only", 3), {}) is None


def stub_specs(tmp_path) -> list:
    """baseline and retrofit_mla_only at seeds 0 and 1 with the driver replaced by a script: the source writes its
    step-0 checkpoint marker (seed 0) or fails (seed 1); the dependent fails unless the marker is already there."""
    experiments = load_experiments(extra=TINY)
    specs = ablation.plan_runs([experiments["retrofit_mla_only"], experiments["baseline"]], [0, 1], tmp_path)
    out = []
    for spec in specs:
        if spec.source is None:
            step = Path(spec.run_dir) / "checkpoints" / "step_000000"
            body = ("import sys, time; time.sleep(1)" if spec.seed == 0 else "import sys; sys.exit(1)") + (
                f"; p = __import__('pathlib').Path({str(step)!r}); p.mkdir(parents=True); "
                "(p / 'COMPLETE').write_text('0')")
        else:
            marker = Path(spec.source_policy).parent / "COMPLETE"
            body = f"import sys; sys.exit(0 if __import__('pathlib').Path({str(marker)!r}).is_file() else 3)"
        out.append(dataclasses.replace(spec, command=(sys.executable, "-c", body)))
    return out


@pytest.mark.parametrize("local", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_a_dependent_waits_for_its_source_and_a_failed_source_fails_it(tmp_path, monkeypatch, local):
    # Ray's workers import this test's copy of the script by its module name, run_ablation.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SCRIPT.parent), os.environ.get("PYTHONPATH", "")]))
    args = argparse.Namespace(local=local, cpus_per_run=1.0, gpus_per_run=0.0, poll=0.2)
    rows = {(r["experiment"], r["seed"]): r for r in ablation.run_specs(stub_specs(tmp_path), [], args)}
    assert rows[("baseline", 0)]["status"] == rows[("retrofit_mla_only", 0)]["status"] == "finished"
    assert rows[("baseline", 1)]["status"] == "failed"
    dependent = rows[("retrofit_mla_only", 1)]
    assert dependent["status"] == "failed"
    assert dependent["error"] == "source run baseline seed 1 failed (returncode 1): not started"
    assert not (tmp_path / "retrofit_mla_only" / "seed_1" / "driver.log").exists()


def test_dry_run_lists_the_retrofit_arm_from_the_converted_model(capsys):
    assert ablation.main(["--dry-run", "--json", "--base", "rl/presets/study.yaml", "--experiments", "baseline",
                          *RETROFITS]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    experiments = load_experiments(base="rl/presets/study.yaml")
    for name in RETROFITS:
        row, model = rows[name], retrofit_preview(experiments[name])
        assert row["retrofit_from"] == "baseline" and row["group"] == name.removeprefix("retrofit_")
        assert row["parameters"] == sum(p.numel() for p in model.parameters())
        assert row["flops_per_token"] == param_count.flops_per_token(model.config)
        # The conversion keeps GQA's cache: C + R = 2GD = 2 x 2 x 32 per layer (models/convert.py defaults).
        assert row["cache_bytes_per_token"] == rows["baseline"]["cache_bytes_per_token"] == 4 * 128 * 4
    assert rows["retrofit_baseline"]["parameters"] == rows["baseline"]["parameters"]  # continued, not converted
    assert rows["retrofit_mla_lru_adaptive"]["global_halting"] == 0.5
    assert rows["retrofit_mla_lru_fixed"]["halting"] == "fixed" and rows["retrofit_mla_only"]["lru_layers"] == 0
    assert ablation.main(["--dry-run", "--experiments", "retrofit_mla_only"]) == 0
    assert "retrofit of baseline's step-0 checkpoint" in capsys.readouterr().out
