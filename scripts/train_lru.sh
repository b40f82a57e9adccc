#!/usr/bin/env bash
# Launch an experiment of the LRU study.
#
#   bash scripts/train_lru.sh [baseline|mla_only|mla_lru_fixed|mla_lru_adaptive|all] [section.field=value ...]
#
# Builds the causal-loop dataset in DATA_DIR (unless it is there) and checks the reward on it, then trains
# the group's model with PPO (python -m rl.driver, preset rl/presets/tiny.yaml): a supervised warm start
# on worked solutions, then PPO on the causal-loop stream. "all" trains the four groups one after another
# with the same data, budget and seeds, then compares them (comparison.md: accuracies with intervals and
# paired tests). Extra arguments override config fields.
set -euo pipefail

GROUPS_VALID="baseline mla_only mla_lru_fixed mla_lru_adaptive all"
usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  cat <<USAGE

Environment:
  EXPERIMENT_NAME   run name (default: the group); the run directory is OUTPUT_DIR/EXPERIMENT_NAME
  OUTPUT_DIR        where runs and data go (default: outputs)
  DATA_DIR          causal-loop parquet files to check (default: OUTPUT_DIR/data/causal_loop; generated if missing)
  BASE_MODEL        a local transformers checkpoint to start from (default: a tiny model from scratch)
  N_GPUS            GPUs to use (default: 0 = CPU)
  NNODES            nodes the Ray cluster must have (default 1); more than 1 needs RAY_ADDRESS
  RAY_ADDRESS       join this Ray cluster instead of starting a local one
  WANDB_MODE        offline (default), online or disabled
  NUM_SAMPLES       problems in the generated training split (default: 20000)
  SEED              dataset seed (default: 0)
  PYTHON            python interpreter (default: .venv/bin/python, made by scripts/setup.sh)
Re-running with the same EXPERIMENT_NAME resumes the run from its last checkpoint.
USAGE
}

GROUP="mla_lru_adaptive"
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  *=*|"") ;;  # no group given: overrides only, or nothing
  *) GROUP="$1"; shift ;;
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
EXPERIMENT_NAME="${EXPERIMENT_NAME:-$GROUP}"
N_GPUS="${N_GPUS:-0}"
export NNODES="${NNODES:-1}"
if [[ ! "$NNODES" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NNODES='$NNODES' must be a positive integer" >&2
  exit 2
fi
if [[ "$NNODES" != "1" && -z "${RAY_ADDRESS:-}" ]]; then
  echo "error: NNODES=$NNODES needs a Ray cluster: run 'ray start --head' on one node and" \
       "'ray start --address=<head>:6379' on the others, then set RAY_ADDRESS=<head>:6379" >&2
  exit 2
fi

if [[ -f "$DATA_DIR/train.parquet" && -f "$DATA_DIR/test.parquet" ]]; then
  echo "[data] using $DATA_DIR"
else
  echo "[data] generating the causal-loop dataset in $DATA_DIR"
  "$PYTHON" -m data.causal_loop --local_dir "$DATA_DIR" --num_samples "$NUM_SAMPLES" --seed "$SEED" --quiet
fi
echo "[reward] checking the reward on $DATA_DIR/test.parquet"
"$PYTHON" scripts/score_sample.py "$DATA_DIR/test.parquet"

common=("logging.wandb_mode=${WANDB_MODE:-offline}")
[[ -n "${BASE_MODEL:-}" ]] && common+=("model.path=$BASE_MODEL")
[[ "$N_GPUS" != "0" ]] && common+=("trainer.device=cuda")

train_group() {  # $1: group, $2: run directory, then overrides
  local group="$1" run_dir="$2"
  shift 2
  echo "[train] group $group -> $run_dir"
  "$PYTHON" -m rl.driver "model.group=$group" "logging.run_dir=$run_dir" "${common[@]}" "$@"
}

if [[ "$GROUP" == "all" ]]; then
  runs=()
  for g in baseline mla_only mla_lru_fixed mla_lru_adaptive; do
    train_group "$g" "$OUTPUT_DIR/$EXPERIMENT_NAME/$g" "$@"
    runs+=("$OUTPUT_DIR/$EXPERIMENT_NAME/$g")
  done
  echo "[compare] $OUTPUT_DIR/$EXPERIMENT_NAME/comparison.md"
  "$PYTHON" -m rl.compare "${runs[@]}" --out "$OUTPUT_DIR/$EXPERIMENT_NAME"
else
  train_group "$GROUP" "$OUTPUT_DIR/$EXPERIMENT_NAME" "$@"
fi
