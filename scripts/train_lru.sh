#!/usr/bin/env bash
# Launch an experiment of the LRU study.
#
#   bash scripts/train_lru.sh [baseline|mla_only|mla_lru_fixed|mla_lru_adaptive|all] [section.field=value ...]
#
# What runs today: the task layer. It builds the causal-loop dataset in DATA_DIR (unless it is already
# there) and scores a sample of the test split with the reward, as a check of both. Model training is
# not built yet (see the README): the script says so and stops there rather than pretend.
set -euo pipefail

GROUPS_VALID="baseline mla_only mla_lru_fixed mla_lru_adaptive all"
usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  cat <<USAGE

Environment:
  DATA_DIR          dataset directory (default: \$OUTPUT_DIR/data/causal_loop; generated if missing)
  OUTPUT_DIR        where runs and data go (default: outputs)
  NUM_SAMPLES       training problems to generate (default: 20000)
  SEED              dataset seed (default: 0)
  PYTHON            python interpreter (default: .venv/bin/python, made by scripts/setup.sh)
USAGE
}

GROUP="${1:-mla_lru_adaptive}"
case "$GROUP" in
  -h|--help) usage; exit 0 ;;
esac
if [[ " $GROUPS_VALID " != *" $GROUP "* ]]; then
  echo "error: unknown group '$GROUP'; choose one of: $GROUPS_VALID" >&2
  exit 2
fi

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUTPUT_DIR="${OUTPUT_DIR:-outputs}"
DATA_DIR="${DATA_DIR:-$OUTPUT_DIR/data/causal_loop}"
NUM_SAMPLES="${NUM_SAMPLES:-20000}"
SEED="${SEED:-0}"

if [[ -f "$DATA_DIR/train.parquet" && -f "$DATA_DIR/test.parquet" ]]; then
  echo "[data] using $DATA_DIR"
else
  echo "[data] generating the causal-loop dataset in $DATA_DIR"
  "$PYTHON" -m data.causal_loop --local_dir "$DATA_DIR" --num_samples "$NUM_SAMPLES" --seed "$SEED"
fi

echo "[reward] scoring a sample of $DATA_DIR/test.parquet"
"$PYTHON" scripts/score_sample.py "$DATA_DIR/test.parquet"

echo "[train] group '$GROUP': model training is not implemented yet (models/ and rl/ are the next issues)."
