"""PNG training curves from run directories, runs overlaid (one line per run, named after its directory).

    python -m rl.plot outputs/baseline outputs/mla_lru_adaptive --out outputs/curves
    python -m rl.plot outputs/run --watch 30        # redraw every 30 s while the run goes (Ctrl-C stops)

One PNG per metric that any run logged: reward, accuracy, held-out accuracy by split, KL, entropy,
response length, clip fraction, value loss, LRU iterations, and the warm start's loss.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from rl.tracking import WARM_START_FILE, read_metrics  # noqa: E402

CURVES = {
    "reward": ["reward/mean"], "accuracy": ["reward/acc"], "format_rate": ["reward/format"],
    "kl": ["train/kl_ref"], "approx_kl": ["train/approx_kl"], "entropy": ["train/entropy"],
    "response_length": ["response/length_mean"],
    "clip_fraction": ["train/clipfrac"], "value_loss": ["train/value_loss"], "lru_iterations": ["train/lru_iterations"],
}


def eval_keys(runs: dict[str, list[dict]]) -> dict[str, list[str]]:
    """One curve per held-out split and decoding: eval/<split>/acc (greedy) and eval/<split>/acc_sampled."""
    keys = sorted({k for rows in runs.values() for row in rows for k in row
                   if k.startswith("eval/") and k.endswith(("/acc", "/acc_sampled"))})
    return {f"heldout_{k.split('/')[1]}_{'sampled_' if k.endswith('sampled') else ''}accuracy": [k] for k in keys}


def plot_runs(run_dirs: list[Path], out: Path) -> list[Path]:
    """Write the PNGs; return their paths."""
    runs = {Path(d).name or str(d): read_metrics(Path(d)) for d in run_dirs}
    warm = {Path(d).name or str(d): read_metrics(Path(d), WARM_START_FILE) for d in run_dirs}
    if not any(runs.values()) and not any(warm.values()):
        raise ValueError(f"no metrics.jsonl or warm_start.jsonl with rows in {[str(d) for d in run_dirs]}")
    out.mkdir(parents=True, exist_ok=True)
    curves = {**CURVES, **eval_keys(runs)}
    written = [_figure(runs, "step", name, keys, "PPO step", out) for name, keys in curves.items()]
    written.append(_figure(warm, "sft/step", "warm_start_loss", ["sft/loss"], "warm-start step", out))
    return [p for p in written if p is not None]


def _figure(runs: dict[str, list[dict]], step_key: str, name: str, keys: list[str], xlabel: str,
            out: Path) -> Path | None:
    """One PNG of ``keys`` against ``step_key``, a line per run; None if no run logged them."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for label, rows in runs.items():
        for key in keys:
            points = [(r[step_key], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="." if len(points) < 20 else None, label=label)
                drawn = True
    path = None
    if drawn:
        ax.set_title(name.replace("_", " ")), ax.set_xlabel(xlabel), ax.grid(alpha=0.3), ax.legend()
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path.with_suffix(".tmp.png"), dpi=100)  # then renamed: a viewer never sees half a file
        path.with_suffix(".tmp.png").replace(path)
    plt.close(fig)
    return path


def watch(run_dirs: list[Path], out: Path, every_s: float, count: int | None = None) -> int:
    """Redraw every ``every_s`` seconds (``count`` times, or until Ctrl-C); a run with no rows yet is waited for."""
    drawn = 0
    while count is None or drawn < count:
        try:
            written = plot_runs(run_dirs, out)
            print(f"{time.strftime('%H:%M:%S')} redrew {len(written)} curves in {out}", flush=True)
        except ValueError as e:  # nothing logged yet
            print(f"{time.strftime('%H:%M:%S')} {e}; waiting", flush=True)
        drawn += 1
        if count is None or drawn < count:
            time.sleep(every_s)
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: the first run's curves/)")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS until Ctrl-C")
    parser.add_argument("--count", type=int, help="with --watch: stop after this many redraws")
    args = parser.parse_args(argv)
    out = args.out or args.runs[0] / "curves"
    if args.watch is not None:
        if args.watch <= 0:
            parser.error(f"--watch {args.watch}: give a positive number of seconds")
        try:
            watch(args.runs, out, args.watch, args.count)
        except KeyboardInterrupt:
            pass
        return 0
    try:
        written = plot_runs(args.runs, out)
    except ValueError as e:
        parser.error(str(e))
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
