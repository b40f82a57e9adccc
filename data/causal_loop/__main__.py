"""Write causal-loop train / test / held-out (and optionally validation) splits as verl-schema parquet files.

    python -m data.causal_loop --local_dir data/causal_loop_tiny --num_samples 100000 --levels 1,2,3,4

Every argument is checked before any work starts. Files written (atomically): train.parquet,
test.parquet, test_more_steps.parquet, test_more_vars.parquet, validation.parquet with --num_validation
(same setting as training, disjoint from train and test: tune on it, keep test unseen) and
dataset_info.json (the config, seed and sizes that made them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import yaml
from tqdm import tqdm

from data.causal_loop.config import OP_NAMES, TaskConfig
from data.causal_loop.dataset import QUESTION_STYLES, TEMPLATES, build_splits, heldout_configs, to_table, write_parquet


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _int_range(text: str) -> tuple[int, int]:
    values = _int_list(text)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give a range as MIN,MAX (or one number)")
    return values


def _weights(text: str) -> dict[str, float]:
    try:
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give weights as name=weight,… with names {OP_NAMES}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data.causal_loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_dir", required=True, help="output directory (created if missing)")
    p.add_argument("--num_samples", type=int, default=100_000, help="training problems (default 100000)")
    p.add_argument("--num_test", type=int, default=1000, help="test problems, same setting as training")
    p.add_argument("--num_heldout", type=int, default=1000, help="problems in each held-out split (0: none)")
    p.add_argument("--num_validation", type=int, default=0,
                   help="validation problems, same setting as training, disjoint from train and test (default 0: none)")
    p.add_argument("--config", help="YAML file with TaskConfig fields; the flags below override it")
    p.add_argument("--levels", type=_int_list, help="levels to draw, e.g. 1,2,3,4")
    p.add_argument("--num_vars", type=_int_range, help="MIN,MAX variables per problem")
    p.add_argument("--num_steps", type=_int_range, help="MIN,MAX steps")
    p.add_argument("--inner_steps", type=_int_range, help="MIN,MAX inner repetitions (level 4)")
    p.add_argument("--init_values", type=_int_range, help="MIN,MAX initial values")
    p.add_argument("--modulus", type=int, help="all arithmetic modulo this")
    p.add_argument("--semantics", type=lambda s: tuple(s.split(",")), help="simultaneous,sequential")
    p.add_argument("--op_weights", type=_weights, help=f"op frequencies, e.g. copy=1,add_source=2 ({OP_NAMES})")
    p.add_argument("--extra_self_rules", type=int, help="up to this many extra constant rules per problem")
    p.add_argument("--heldout_steps", type=_int_range, help="MIN,MAX steps of test_more_steps (default: past train)")
    p.add_argument("--heldout_vars", type=_int_range, help="MIN,MAX variables of test_more_vars (default: past train)")
    p.add_argument("--template", choices=TEMPLATES, default="chat", help="prompt for a chat template or a base model")
    p.add_argument("--question_style", choices=QUESTION_STYLES, default="full",
                   help="the question with its instructions' prose (full) or without (compact: models from scratch)")
    p.add_argument("--allow_duplicates", action="store_true", help="keep duplicate problems within a split")
    p.add_argument("--allow_trivial", action="store_true", default=None,
                   help="keep problems whose answer is their initial state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _task_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TaskConfig:
    values = {}
    if args.config:
        try:
            values = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            parser.error(f"--config {args.config}: cannot read it as YAML ({e})")
        unknown = set(values) - set(TaskConfig.__dataclass_fields__)
        if unknown:
            parser.error(f"--config {args.config}: unknown field(s) {sorted(unknown)}; "
                         f"valid fields are {sorted(TaskConfig.__dataclass_fields__)}")
    for name in TaskConfig.__dataclass_fields__:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    try:
        return TaskConfig(**values)
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def _check_writable(directory: Path, parser: argparse.ArgumentParser) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as e:
        parser.error(f"--local_dir {directory}: not a writable directory ({e.strerror})")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("num_samples", "num_test", "num_heldout", "num_validation"):
        if getattr(args, name) < 0:
            parser.error(f"--{name}={getattr(args, name)}: must be >= 0")
    cfg = _task_config(args, parser)
    try:
        heldout = heldout_configs(cfg, args.heldout_steps, args.heldout_vars) if args.num_heldout else {}
    except ValueError as e:
        parser.error(str(e))
    out = Path(args.local_dir)
    _check_writable(out, parser)

    start = time.perf_counter()
    sizes = {"train": args.num_samples, "test": args.num_test, **{k: args.num_heldout for k in heldout}}
    if args.num_validation:
        sizes["validation"] = args.num_validation
    with tqdm(total=3, desc="causal_loop", disable=args.quiet, unit="stage") as bar:
        bar.set_postfix_str("generating")
        try:
            splits = build_splits(cfg, args.num_samples, args.num_test, args.seed, heldout, args.num_heldout,
                                  dedup=not args.allow_duplicates, num_validation=args.num_validation)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        bar.update()
        bar.set_postfix_str("rendering")
        tables = {name: to_table(batch, name, keys, args.template, question_style=args.question_style)
                  for name, (batch, keys) in splits.items()}
        bar.update()
        bar.set_postfix_str("writing")
        for name, table in tables.items():
            write_parquet(table, out / f"{name}.parquet")
        bar.update()
    info = {"task": asdict(cfg), "heldout": {k: asdict(v) for k, v in heldout.items()}, "sizes": sizes,
            "seed": args.seed, "template": args.template, "question_style": args.question_style,
            "dedup": not args.allow_duplicates,
            "seconds": round(time.perf_counter() - start, 3)}
    tmp = out / ".dataset_info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out / "dataset_info.json")
    if not args.quiet:
        print(f"wrote {', '.join(f'{k}={len(t)}' for k, t in tables.items())} to {out} in {info['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
