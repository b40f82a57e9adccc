"""PNG training curves from run directories, runs overlaid (one line per run, named after its directory).

    python -m rl.plot outputs/baseline outputs/mla_lru_adaptive --out outputs/curves

One PNG per metric that any run logged: reward, accuracy, held-out accuracy by split, KL, entropy,
response length, clip fraction, value loss, LRU iterations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from rl.tracking import read_metrics  # noqa: E402

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
    if not any(runs.values()):
        raise ValueError(f"no metrics.jsonl with rows in {[str(d) for d in run_dirs]}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in {**CURVES, **eval_keys(runs)}.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for label, rows in runs.items():
            for key in keys:
                points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="." if len(points) < 20 else None, label=label)
                    drawn = True
        if drawn:
            ax.set_title(name.replace("_", " ")), ax.set_xlabel("PPO step"), ax.grid(alpha=0.3), ax.legend()
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=100)
            written.append(out / f"{name}.png")
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: the first run's curves/)")
    args = parser.parse_args(argv)
    try:
        written = plot_runs(args.runs, args.out or args.runs[0] / "curves")
    except ValueError as e:
        parser.error(str(e))
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
