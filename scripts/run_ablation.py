"""Train the study's experiments (``rl/presets/experiments.yaml``) over seeds with the PPO driver, then report.

    python scripts/run_ablation.py --dry-run                     # the experiments: parameters, FLOPs, cache
    python scripts/run_ablation.py --experiments mla_lru_adaptive mla_only --seeds 0 1 2 --output-dir outputs/abl
    python scripts/run_ablation.py --report-only --results-dir outputs/abl --latex

A run is ``python -m rl.driver --config BASE <the experiment's overrides> trainer.seed=S data.seed=S
logging.run_dir=DIR/<experiment>/seed_<S>`` (trailing ``section.field=value`` arguments go to every run), its
output in that directory's driver.log and its outcome in ablation_run.json. Runs go seed by seed, so an
interrupted study has every experiment at the same seeds. A run whose summary.json is there is skipped; one that
fails is reported in the final table and the others go on; re-running the command resumes the unfinished ones
(the driver resumes from their last checkpoint). DIR/ablation_manifest.json records the command, the
experiments, the seeds and the git commit; at the end the study report (``rl.study_report``) is written to DIR
from every finished run there.

The retrofit arm: an experiment with ``retrofit_from: X`` (experiments.yaml) starts each seed's run from X's run
at that seed, ``model.path=DIR/X/seed_<S>/checkpoints/step_000000/policy`` (X's warm-started model; the driver
converts it for the experiment's group). Within a seed X's run goes first: its Ray task is an argument of the
dependent's, so Ray starts the dependent only once X's run is over; a failed X fails its dependents without
starting them. When X's run is not part of the invocation, its step-0 checkpoint must be there already.

Placement: one Ray task per run, holding --cpus-per-run CPUs (default: all of this machine's, so one run at a
time here; on a cluster, RAY_ADDRESS set, as many at once as the nodes fit). The task starts the driver as a
subprocess with a Ray instance of its own (RAY_ADDRESS=local): the driver's actors then never wait for CPUs that
the study's tasks hold (they would deadlock once the tasks hold them all), a crashed run takes nothing else down,
each log is its own, and a task given GPUs passes them on through CUDA_VISIBLE_DEVICES. On a cluster DIR must be
on a filesystem every node sees, and the checkout at the same path. --local runs the same subprocesses one at a
time without the outer Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rl.checkpoint import COMPLETE  # noqa: E402
from rl.experiments import (  # noqa: E402
    DEFAULT_FILE,
    ROOT,
    Experiment,
    describe_all,
    load_experiments,
    select,
    step0_policy,
    yaml_value,
)

LOG, RECORD, RUNNING, MANIFEST = "driver.log", "ablation_run.json", "ablation_running.json", "ablation_manifest.json"
SUMMARY = "summary.json"
ACC_SPLIT = "test"  # acc = greedy accuracy on this split
STEP_SPLITS = ("test", "test_more_steps")  # acc_by_steps pools them: same variables, the steps go beyond training


@dataclass(frozen=True)
class RunSpec:
    experiment: str
    seed: int
    run_dir: str
    command: tuple[str, ...]
    steps: int  # trainer.steps: a summary of fewer steps is not finished (the driver extends the run)
    sft_steps: int
    config: dict  # the run's full config, compared with a finished run's config.yaml before skipping it
    source: str | None = None  # retrofit_from: the experiment whose run at this seed it starts from
    source_policy: str | None = None  # that run's step-0 policy (model.path)


# ---- the plan ---------------------------------------------------------------------------------------------

def plan_runs(experiments: list[Experiment], seeds: list[int], out_dir: Path) -> list[RunSpec]:
    """Every (available experiment, seed) as a driver command, seed by seed; within a seed the retrofit
    experiments after the others (their sources), each from its source run's step-0 policy at that seed."""
    specs = []
    for seed in seeds:
        for exp in sorted((e for e in experiments if e.unavailable is None), key=lambda e: e.source is not None):
            run_dir = (out_dir / exp.name / f"seed_{seed}").resolve()
            source = step0_policy(out_dir.resolve(), exp.source.name, seed) if exp.source else None
            extra = [f"trainer.seed={seed}", f"data.seed={seed}", f"logging.run_dir={run_dir}"]
            extra = ([f"model.path={yaml_value(str(source))}"] if source else []) + extra
            cfg = exp.config(extra)
            command = (sys.executable, "-m", "rl.driver", "--config", str(exp.base), *exp.overrides, *extra)
            specs.append(RunSpec(exp.name, seed, str(run_dir), command, cfg.trainer.steps, cfg.trainer.sft_steps,
                                 cfg.to_dict(), exp.source.name if exp.source else None,
                                 str(source) if source else None))
    return specs


def missing_source(spec: RunSpec) -> str | None:
    """Why a retrofit run cannot start from its source's step-0 checkpoint (no COMPLETE marker), else None."""
    if spec.source is None or (Path(spec.source_policy).parent / COMPLETE).is_file():
        return None
    return f"source run {spec.source} seed {spec.seed} has no step-0 checkpoint: run {spec.source} first"


def blocked(spec: RunSpec, states: dict[tuple[str, int], str]) -> str | None:
    """Why a retrofit run is not started in this invocation, else None; ``states``: prior_state of every
    planned run. A source about to run here is waited for; otherwise its checkpoint must be there."""
    state = states.get((spec.source, spec.seed)) if spec.source else None
    if state == "run":
        return None
    if state == "conflict":
        return f"source run {spec.source} seed {spec.seed} conflicts (see its row): not started"
    return missing_source(spec)


def source_failure(spec: RunSpec, sources: tuple[dict, ...]) -> str | None:
    """Why a retrofit run must not start once its source runs (their outcomes) are over, else None."""
    for outcome in sources:
        if outcome["returncode"] != 0:
            return (f"source run {spec.source} seed {spec.seed} failed (returncode {outcome['returncode']}): "
                    "not started")
    return missing_source(spec)


def changed_fields(stored: dict, current: dict) -> list[str]:
    """Fields of a run's config.yaml that differ from ``current``, ignoring logging (it does not change what is
    trained) and trainer.steps (a longer run extends the finished one); fields only one side has are skipped."""
    return sorted(f"{s}.{k}" for s in stored if s != "logging" and isinstance(stored[s], dict)
                  for k in stored[s] if k in current.get(s, {}) and f"{s}.{k}" != "trainer.steps"
                  and stored[s][k] != current[s][k])


def prior_state(spec: RunSpec) -> tuple[str, str]:
    """("skipped", why) for a finished run, ("conflict", why) for a directory holding another config, else
    ("run", "")."""
    run_dir = Path(spec.run_dir)
    config = run_dir / "config.yaml"
    if config.is_file():
        changed = changed_fields(yaml.safe_load(config.read_text()) or {}, spec.config)
        if changed:
            return "conflict", (f"{run_dir} holds a run with a different config ({', '.join(changed)}): move it "
                                "away or use another --output-dir")
    summary = run_dir / SUMMARY
    if summary.is_file() and json.loads(summary.read_text()).get("steps", 0) >= spec.steps:
        return "skipped", "finished before (summary.json)"
    return "run", ""


# ---- one run (the body of a Ray task, or of the --local thread) --------------------------------------------

def execute(spec: RunSpec, env: dict[str, str], *sources: dict) -> dict:
    """Run the driver to the end, its output appended to driver.log; -> returncode, wall_s and the log's tail.
    ``sources``: the outcomes of the runs it starts from (Ray passes them once those tasks are over); if one
    failed, the driver is not started."""
    why = source_failure(spec, sources)
    if why:
        return {"returncode": -1, "wall_s": None, "log_tail": [why]}
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    (run_dir / RUNNING).write_text(json.dumps({"started": start, "host": os.uname().nodename}))
    with (run_dir / LOG).open("a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(spec.command)}\n")
        log.flush()
        proc = subprocess.Popen(spec.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **env})
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C or a cancelled task: let the driver save and stop, never leave it running
            _stop(proc)
            raise
        finally:
            (run_dir / RUNNING).unlink(missing_ok=True)
    tail = (run_dir / LOG).read_text(errors="replace").splitlines()[-40:]
    return {"returncode": code, "wall_s": time.time() - start, "log_tail": tail}


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the driver finishes its step and saves a checkpoint), then SIGKILL after two minutes."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


def error_line(tail: list[str]) -> str:
    """The line of a failed run's log that says what went wrong: the last one naming an error, else the last."""
    lines = [line.strip() for line in tail if line.strip()]
    named = [line for line in lines if "Error" in line or "error:" in line or "Exception" in line]
    return (named or lines or ["no output"])[-1][:300]


def child_env(cpus: float) -> dict[str, str]:
    """What every driver process gets: its own Ray instance, one node, torch threads for the CPUs it holds."""
    return {"RAY_ADDRESS": "local", "NNODES": "1", "PYTHONUNBUFFERED": "1",
            "LRU_RL_THREADS": os.environ.get("LRU_RL_THREADS", str(max(1, int(cpus))))}


def finish(spec: RunSpec, outcome: dict) -> dict:
    """The run's row of the final table, also written to its ablation_run.json."""
    failed = outcome["returncode"] != 0
    row = {"experiment": spec.experiment, "seed": spec.seed, "run_dir": spec.run_dir,
           "command": shlex.join(spec.command), "status": "failed" if failed else "finished",
           "returncode": outcome["returncode"], "wall_s": outcome.get("wall_s"),
           "error": error_line(outcome.get("log_tail", [])) if failed else None}
    path = Path(spec.run_dir) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2))
    return row


# ---- progress -----------------------------------------------------------------------------------------------

def last_row(path: Path) -> dict | None:
    """The last JSON line of a log file (read from its end: warm-start logs have thousands of lines)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [line for line in f.read().splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):  # not there yet, or a line being written
        return None


def run_stage(spec: RunSpec) -> str:
    """Where a running run is: its last PPO step (metrics.jsonl), else its warm-start step."""
    run_dir = Path(spec.run_dir)
    ppo = last_row(run_dir / "metrics.jsonl")
    if ppo is not None:
        return f"PPO step {ppo.get('step')}/{spec.steps}"
    sft = last_row(run_dir / "warm_start.jsonl")
    return f"warm start {sft.get('sft/step')}/{spec.sft_steps}" if sft else "starting"


def started_at(spec: RunSpec, since: float) -> float | None:
    """When the run's task started in this invocation (its ablation_running.json), None if it has not yet."""
    try:
        started = json.loads((Path(spec.run_dir) / RUNNING).read_text())["started"]
    except (OSError, ValueError, KeyError):
        return None
    return started if started >= since else None


def duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def time_left(walls: list[float], elapsed: list[float], queued: int) -> str:
    """Mean wall time of the finished runs, times the work left, over the runs going at once."""
    if not walls:
        return "time left unknown until a run finishes"
    mean = float(np.mean(walls))
    work = sum(max(mean - e, 0.0) for e in elapsed) + mean * queued
    return f"~{duration(work / max(1, len(elapsed)))} left"


def progress_line(pending: list[RunSpec], rows: list[dict], total: int, walls: list[float], since: float,
                  now: float | None = None) -> str:
    """Runs done and failed, where each running run is and for how long, and the time left."""
    now = time.time() if now is None else now
    running = [(s, t) for s in pending if (t := started_at(s, since)) is not None]
    failed = sum(r["status"] == "failed" for r in rows)
    parts = [f"{s.experiment} seed {s.seed}: {run_stage(s)} ({duration(now - t)})" for s, t in running]
    left = time_left(walls, [now - t for _, t in running], len(pending) - len(running))
    return (f"[ablation] {len(rows)}/{total} done ({failed} failed) | " + (" | ".join(parts) or "waiting to start")
            + f" | {left}")


# ---- running the plan ---------------------------------------------------------------------------------------

def run_specs(specs: list[RunSpec], walls: list[float], args: argparse.Namespace) -> list[dict]:
    """Every spec run (Ray tasks, or one at a time with --local); a row per run as each finishes."""
    if not specs:
        return []
    env, since = child_env(args.cpus_per_run), time.time()
    if args.local:
        with ThreadPoolExecutor(max_workers=1) as pool:  # one run at a time; the thread only waits on the driver
            # In submission order: a source (planned first within its seed) is over when its dependent starts.
            by_run: dict[tuple[str, int], Future] = {}
            for s in specs:
                deps = [by_run[k] for k in [(s.source, s.seed)] if k in by_run]
                by_run[(s.experiment, s.seed)] = pool.submit(
                    lambda s=s, deps=deps: execute(s, env, *[d.result() for d in deps]))
            futures = {by_run[(s.experiment, s.seed)]: s for s in specs}
            return _gather(futures, lambda fs: wait_futures(fs, args.poll, FIRST_COMPLETED)[0], Future.result, (),
                           walls, since)
    import ray

    _init_ray(args.cpus_per_run, args.gpus_per_run)
    task = ray.remote(execute).options(num_cpus=args.cpus_per_run, num_gpus=args.gpus_per_run, max_retries=0)
    refs: dict = {}
    for s in specs:  # a source's ref as an argument: Ray starts the dependent once the source's task is over
        refs[(s.experiment, s.seed)] = task.remote(s, env, *[refs[k] for k in [(s.source, s.seed)] if k in refs])
    futures = {refs[(s.experiment, s.seed)]: s for s in specs}
    try:
        # A task that died (its worker, its node) is that run's failure, not the study's.
        return _gather(futures, lambda fs: ray.wait(fs, num_returns=1, timeout=args.poll)[0], ray.get,
                       (ray.exceptions.RayError,), walls, since)
    except KeyboardInterrupt:
        for ref in futures:
            ray.cancel(ref)  # the task's KeyboardInterrupt asks its driver to save and stop
        ray.wait(list(futures), num_returns=len(futures), timeout=150)
        raise
    finally:
        ray.shutdown()


def _gather(futures: dict, wait, result, errors: tuple[type[BaseException], ...], walls: list[float],
            since: float) -> list[dict]:
    """Rows of the runs as they finish, with a progress line at every poll; ``errors``: what a task raising
    means a failed run."""
    rows, pending, total = [], dict(futures), len(futures)
    while pending:
        for future in wait(list(pending)):
            spec = pending.pop(future)
            try:
                outcome = result(future)
            except errors as e:
                outcome = {"returncode": -1, "log_tail": [f"task error: {str(e).splitlines()[0]}"]}
            rows.append(finish(spec, outcome))
            if rows[-1]["status"] == "finished":
                walls.append(rows[-1]["wall_s"])
            print(f"[ablation] {spec.experiment} seed {spec.seed}: {rows[-1]['status']}"
                  + (f" ({rows[-1]['error']})" if rows[-1]["error"] else ""), flush=True)
        if pending:
            print(progress_line(list(pending.values()), rows, total, walls, since), flush=True)
    return rows


def _init_ray(cpus: float, gpus: float) -> None:
    """Local Ray with this machine's CPUs, or the cluster RAY_ADDRESS names; refuse tasks no node can hold."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             **({} if address else {"num_cpus": os.cpu_count() or 1}))
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        ray.shutdown()
        raise ValueError(f"--cpus-per-run {cpus:g} --gpus-per-run {gpus:g}: no node of the Ray cluster has that "
                         f"many (nodes: {[(n.get('CPU', 0), n.get('GPU', 0)) for n in nodes]}); lower them")


# ---- collecting finished runs for rl.study_report ----------------------------------------------------------

def last_test_eval(run_dir: Path) -> dict | None:
    """The last evals/step_N.json holding the test split (evaluations between hold validation only)."""
    for path in sorted((run_dir / "evals").glob("step_*.json"), reverse=True):
        records = json.loads(path.read_text())
        if ACC_SPLIT in records:
            return records
    return None


def _pooled_steps(records: dict, field: str) -> list[tuple[int, float]]:
    """(num_steps, value of ``field``) of every problem of ``STEP_SPLITS`` that has the field."""
    return [(int(steps), float(value)) for split in STEP_SPLITS if field in records.get(split, {})
            for steps, value in zip(records[split]["num_steps"], records[split][field], strict=True)]


def by_steps(records: dict, field: str = "acc") -> dict[str, float] | None:
    """Per-problem ``field`` (greedy accuracy, or LRU iterations) averaged per number of reasoning steps over
    ``STEP_SPLITS``: {"2": mean, ...}; None when no problem has the field."""
    pooled: dict[int, list[float]] = {}
    for steps, value in _pooled_steps(records, field):
        pooled.setdefault(steps, []).append(value)
    return {str(k): float(np.mean(v)) for k, v in sorted(pooled.items())} or None


def iterations_steps_rho(records: dict) -> float | None:
    """Spearman's rho between each problem's LRU iterations (per greedy response token) and its number of
    steps, over ``STEP_SPLITS``: does halting spend more on harder problems? None without iterations in the
    records, with one step count, or with iterations that never vary (fixed halting)."""
    pairs = _pooled_steps(records, "lru_iterations")
    steps, iterations = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    if len(set(steps.tolist())) < 2 or np.ptp(iterations) == 0:
        return None
    return float(spearmanr(steps, iterations).statistic)


def run_record(run_dir: Path, experiment: str, seed: int) -> tuple[dict | None, list[dict], list[str]]:
    """(rl.study_report run, its per-problem records, notes) of one finished run; None with a note if unusable."""
    summary = json.loads((run_dir / SUMMARY).read_text())
    records, notes = last_test_eval(run_dir), []
    name = f"{experiment} seed {seed}"
    if records is None:
        return None, [], [f"{name}: no evals/step_N.json with the {ACC_SPLIT} split: left out"]
    passed = summary.get("warm_start_passed")
    if passed is None:
        notes.append(f"{name}: summary.json has no warm_start_passed (no warm-start criterion): counted as passed")
    outcome = json.loads((run_dir / RECORD).read_text()) if (run_dir / RECORD).is_file() else {}
    if outcome.get("wall_s") is None:
        notes.append(f"{name}: no {RECORD} with its wall time (not run by this script): wall_s n/a")
    test = records[ACC_SPLIT]
    run = {"experiment": experiment, "seed": seed, "passed_warm_start": True if passed is None else bool(passed),
           "metrics": {"acc": float(np.mean(test["acc"])), "acc_by_steps": by_steps(records),
                       "iterations_mean": summary.get("lru_iterations_mean"), "wall_s": outcome.get("wall_s"),
                       "iterations_by_steps": by_steps(records, "lru_iterations"),
                       "iterations_steps_rho": iterations_steps_rho(records),
                       "warm_start_loss": summary.get("warm_start_loss_last"),
                       "acc_before_ppo": (summary.get("heldout_before_ppo") or {}).get(f"{ACC_SPLIT}/acc")}}
    problems = [{"experiment": experiment, "seed": seed, "problem_key": key, "correct": float(acc),
                 "num_steps": int(steps)} for key, acc, steps in zip(test["key"], test["acc"], test["num_steps"],
                                                                       strict=True)]
    return run, problems, notes


def collect(results_dir: Path) -> tuple[list[dict], list[dict], list[str]]:
    """Every finished run under DIR/<experiment>/seed_<s>: (runs, problems, notes) for ``write_report``."""
    runs, problems, notes = [], [], []
    for run_dir in sorted(p for p in results_dir.glob("*/seed_*") if p.is_dir()):
        experiment, seed_text = run_dir.parent.name, run_dir.name.removeprefix("seed_")
        if not seed_text.isdigit():
            notes.append(f"{run_dir}: not a seed_<integer> directory: left out")
            continue
        if not (run_dir / SUMMARY).is_file():
            notes.append(f"{experiment} seed {seed_text}: not finished (no {SUMMARY}): left out")
            continue
        run, run_problems, run_notes = run_record(run_dir, experiment, int(seed_text))
        notes += run_notes
        if run is not None:
            runs.append(run)
            problems += run_problems
    return runs, problems, notes


# What a committed copy of a study keeps of each run: enough to skip it on a re-run (summary.json, config.yaml),
# to rebuild the report (--report-only), and to read its curves; not checkpoints, logs of the backends, figures.
EXPORT_FILES = (SUMMARY, "config.yaml", "run_info.json", RECORD, "metrics.jsonl", "warm_start.jsonl", "report.md")
EXPORT_DROP = ("response", "response_sampled", "ground_truth")  # per-problem texts: 90% of an eval record's size


def export(results_dir: Path, dest: Path) -> list[Path]:
    """Copy every finished run's small files under ``results_dir`` to ``dest`` (same layout), its eval records
    without the response texts, and the study's manifest and report; -> the runs copied."""
    copied = []
    for run_dir in sorted(p for p in results_dir.glob("*/seed_*") if (p / SUMMARY).is_file()):
        out = dest / run_dir.relative_to(results_dir)
        (out / "evals").mkdir(parents=True, exist_ok=True)
        for name in EXPORT_FILES:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, out / name)
        for path in sorted((run_dir / "evals").glob("step_*.json")):
            records = json.loads(path.read_text())
            slim = {split: {k: v for k, v in cols.items() if k not in EXPORT_DROP} for split, cols in records.items()}
            (out / "evals" / path.name).write_text(json.dumps(slim))
        copied.append(out)
    for name in (MANIFEST, "report.md", "report.json", "report.tex"):
        if (results_dir / name).is_file():
            shutil.copy2(results_dir / name, dest / name)
    if (results_dir / "figures").is_dir():
        shutil.copytree(results_dir / "figures", dest / "figures", dirs_exist_ok=True)
    return copied


def report(results_dir: Path, latex: bool) -> dict | None:
    """The study report of every finished run under ``results_dir``, written there; None if there is none."""
    from rl.study_report import write_report  # matplotlib, scipy, statsmodels: only when reporting

    runs, problems, notes = collect(results_dir)
    for note in notes:
        print(f"[report] {note}")
    if not runs:
        print(f"[report] no finished runs under {results_dir}: no report written")
        return None
    study = write_report(runs, problems, results_dir, latex=latex)
    with (results_dir / "report.md").open("a") as f:
        f.write("\n## Collection notes\n\n" + ("\n".join(f"- {n}" for n in notes) or "none") + "\n")
    data = json.loads((results_dir / "report.json").read_text())
    (results_dir / "report.json").write_text(json.dumps({**data, "collection_notes": notes}, indent=2) + "\n")
    print(f"[report] {len(runs)} runs -> {results_dir / 'report.md'}")
    return study


# ---- tables and the manifest --------------------------------------------------------------------------------

def _number(value: object) -> str:
    return "n/a" if value is None else f"{value:,}"


def lru_cell(row: dict) -> str:
    if not row.get("lru_layers"):
        return "-"
    k = f"K={row['iterations']}" if row["halting"] == "fixed" else f"K<={row['iterations']}"
    return f"{k} {row['halting']} w{row['conv_kernel']} g{row['global_halting']:g} x{row['lru_layers']}"


def aux_cell(row: dict) -> str:
    weights = row.get("aux_weights")
    return "-" if not weights else "/".join(f"{weights[k]:g}" for k in ("stability", "sparsity", "ponder"))


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def dry_run_table(rows: list[dict]) -> str:
    header = ["experiment", "group", "parameters", "FLOPs/token", "cache B/token", "LRU", "aux s/sp/p", "overrides"]
    body = []
    for r in rows:
        if not r["available"]:
            body.append([r["name"], r["group"], "-", "-", "-", "-", "-", f"not available: {r['reason']}"])
            continue
        note = " ".join(r["overrides"]) + (f"  (same model and run as {r['same_as']})" if r["same_as"] else "")
        if r.get("retrofit_from"):
            note = f"retrofit of {r['retrofit_from']}'s step-0 checkpoint; " + note
        body.append([r["name"], r["group"], _number(r["parameters"]), _number(r["flops_per_token"]),
                     _number(r["cache_bytes_per_token"]), lru_cell(r), aux_cell(r), note])
    dtypes = sorted({r["cache_dtype"] for r in rows if r["available"]})
    no_flops = any(r["available"] and r["flops_per_token"] is None for r in rows)
    bases = ", ".join(dict.fromkeys(r["base"] for r in rows))
    legend = (f"cache bytes per token in {', '.join(dtypes)}; LRU: K iterations, halting, conv kernel w, global "
              "halting weight g, x LRU layers; aux: stability/sparsity/ponder weights (ponder counts only with "
              "adaptive halting)" + ("; FLOPs n/a: models.param_count has no flops_per_token yet" if no_flops else ""))
    return f"base preset: {bases}\n{format_table(header, body)}\n\n{legend}"


def final_table(rows: list[dict]) -> str:
    body = [[r["experiment"], str(r.get("seed", "-")), r["status"],
             duration(r["wall_s"]) if r.get("wall_s") is not None else "-", r.get("acc", "-"), r.get("error") or ""]
            for r in rows]
    return format_table(["experiment", "seed", "status", "wall", "test acc", "error / note"], body)


def test_acc(run_dir: str) -> str:
    path = Path(run_dir) / SUMMARY
    acc = json.loads(path.read_text()).get("heldout_after_ppo", {}).get(f"{ACC_SPLIT}/acc") if path.is_file() else None
    return "-" if acc is None else f"{acc:.3f}"


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def write_manifest(out_dir: Path, argv: list[str], args: argparse.Namespace, rows: list[dict]) -> Path:
    """DIR/ablation_manifest.json: how to rerun this invocation and what each run did."""
    commit = git("rev-parse", "HEAD")
    manifest = {"command": shlex.join([sys.executable, str(Path(__file__).resolve()), *argv]), "cwd": os.getcwd(),
                "experiments_file": str(args.experiments_file),
                "experiments": list(dict.fromkeys(r["experiment"] for r in rows)),
                "seeds": args.seeds, "base": args.base, "overrides": args.overrides, "git_commit": commit,
                "git_dirty": bool(git("status", "--porcelain")) if commit else None,
                "written": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


# ---- the command --------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.field=value for every run (after the experiment's)")
    parser.add_argument("--experiments-file", default=str(DEFAULT_FILE), help="the experiment list (YAML)")
    parser.add_argument("--experiments", nargs="+", metavar="NAME", help="run these (default: all, in file order)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (trainer.seed and data.seed)")
    parser.add_argument("--output-dir", default="outputs/ablation", help="runs go to DIR/<experiment>/seed_<s>")
    parser.add_argument("--base", help="preset every experiment starts from (default: each one's base)")
    parser.add_argument("--dry-run", action="store_true", help="print the experiments (parameters, FLOPs, cache)")
    parser.add_argument("--json", action="store_true", help="with --dry-run: JSON instead of a table")
    parser.add_argument("--local", action="store_true", help="no outer Ray: run the drivers one at a time")
    parser.add_argument("--cpus-per-run", type=float, default=float(os.cpu_count() or 1),
                        help="CPUs each run's Ray task holds (default: this machine's, one run at a time here)")
    parser.add_argument("--gpus-per-run", type=float, default=0.0,
                        help="GPUs each run's Ray task holds (a CUDA run needs 1 + rollout.workers)")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--report-only", action="store_true", help="no training: the report of the finished runs")
    parser.add_argument("--results-dir", help="with --report-only: where the runs are (default: --output-dir)")
    parser.add_argument("--latex", action="store_true", help="also write report.tex")
    parser.add_argument("--export", metavar="DIR", help="with --report-only: then copy what the report rests on "
                        "(summaries, configs, eval records without response texts, the report) to DIR, to commit")
    args = parser.parse_args(argv)
    if args.json and not args.dry_run:
        parser.error("--json goes with --dry-run")
    if args.export and not args.report_only:
        parser.error("--export goes with --report-only")
    if args.results_dir and not args.report_only:
        parser.error("--results-dir goes with --report-only (runs go to --output-dir)")
    if args.cpus_per_run <= 0 or args.gpus_per_run < 0 or args.poll <= 0:
        parser.error("--cpus-per-run and --poll must be > 0, --gpus-per-run >= 0")
    return args


def dry_run(experiments: list[Experiment], as_json: bool) -> int:
    rows = describe_all(experiments)
    print(json.dumps(rows, indent=2) if as_json else dry_run_table(rows))
    return 0


def train(experiments: list[Experiment], argv: list[str], args: argparse.Namespace) -> int:
    """Run what is not finished, print the final table, write the manifest and the report; 1 if a run failed."""
    out_dir = Path(args.output_dir).resolve()
    specs = plan_runs(experiments, args.seeds, out_dir)
    rows, todo, walls = [], [], []
    prior = {(s.experiment, s.seed): prior_state(s) for s in specs}
    states = {key: state for key, (state, _) in prior.items()}
    for spec in specs:
        state, why = prior[(spec.experiment, spec.seed)]
        if state == "run" and (no_start := blocked(spec, states)):
            rows.append(finish(spec, {"returncode": -1, "log_tail": [no_start]}))
            print(f"[ablation] {spec.experiment} seed {spec.seed}: failed ({no_start})", flush=True)
            continue
        if state == "run":
            todo.append(spec)
            continue
        rows.append({"experiment": spec.experiment, "seed": spec.seed, "run_dir": spec.run_dir,
                     "command": shlex.join(spec.command), "status": state,
                     "error": why if state == "conflict" else None,
                     "wall_s": _recorded_wall(spec) if state == "skipped" else None})
        if rows[-1]["wall_s"] is not None:
            walls.append(rows[-1]["wall_s"])
    rows += [{"experiment": e.name, "status": "not available", "error": e.unavailable}
             for e in experiments if e.unavailable]
    counts = {k: sum(r["status"] == k for r in rows) for k in ("skipped", "conflict", "not available", "failed")}
    print(f"[ablation] to run: {len(todo)}, finished before: {counts['skipped']}, conflicting: {counts['conflict']}, "
          f"experiments not available: {counts['not available']}, sources missing: {counts['failed']}; "
          f"output {out_dir}", flush=True)
    write_manifest(out_dir, argv, args, rows + [{"experiment": s.experiment, "seed": s.seed, "status": "pending"}
                                                for s in todo])
    rows += run_specs(todo, walls, args)
    for row in rows:
        row["acc"] = test_acc(row["run_dir"]) if row["status"] in ("finished", "skipped") else "-"
    print(final_table(rows))
    write_manifest(out_dir, argv, args, rows)
    report(out_dir, args.latex)
    return int(any(r["status"] in ("failed", "conflict") for r in rows))


def _recorded_wall(spec: RunSpec) -> float | None:
    path = Path(spec.run_dir) / RECORD
    return json.loads(path.read_text()).get("wall_s") if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report_only:
        results = Path(args.results_dir or args.output_dir).resolve()
        written = report(results, args.latex)
        if written and args.export:
            print(f"[report] exported {len(export(results, Path(args.export)))} runs to {args.export}")
        return 0 if written else 1
    try:
        experiments = select(load_experiments(args.experiments_file, args.base, args.overrides), args.experiments)
        if args.dry_run:
            return dry_run(experiments, args.json)
        return train(experiments, argv, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
