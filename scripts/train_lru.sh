#!/usr/bin/env bash
# Launch an experiment of the LRU study.
#
#   bash scripts/train_lru.sh [GROUP|all] [section.field=value ...]
#   GROUP: baseline mla_only mla_lru_fixed mla_lru_adaptive mla_only_matched looped
#
# Trains the group's model with PPO (python -m rl.driver, preset rl/presets/tiny.yaml): a supervised warm
# start on worked solutions, then PPO on the causal-loop stream of the preset's task. With DATA_DIR set, it
# trains and evaluates on the verl-schema parquet files there instead (generated first if missing, and the
# reward checked on them). "all" trains every group one after another with the same data, budget and
# seeds, then compares them (comparison.md). Extra arguments override config fields.
set -euo pipefail

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  cat <<USAGE

Environment:
  EXPERIMENT_NAME   run name (default: the group); the run directory is OUTPUT_DIR/EXPERIMENT_NAME
  OUTPUT_DIR        where runs and data go (default: outputs)
  DATA_DIR          train on the parquet files here (train.parquet, test*.parquet; generated if missing)
                    instead of the preset's stream
  BASE_MODEL        a local transformers checkpoint to start from (default: a tiny model from scratch); a
                    Qwen2 one is converted to MLA for the MLA groups (models/convert.py)
  N_GPUS            GPUs to use (default: 0 = CPU)
  NNODES            nodes the Ray cluster must have (default 1); more than 1 needs RAY_ADDRESS
  RAY_ADDRESS       join this Ray cluster instead of starting a local one
  WANDB_MODE        offline (default), online or disabled
  NUM_SAMPLES       problems in a generated DATA_DIR training split (default: 20000)
  SEED              seed of a generated DATA_DIR (default: 0)
  PYTHON            python interpreter (default: .venv/bin/python, made by scripts/setup.sh, else a python3
                    on PATH that has the project installed)
Re-running with the same EXPERIMENT_NAME resumes the run from its last checkpoint.
USAGE
}

GROUP="mla_lru_adaptive"
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  *=*|"") ;;  # no group given: overrides only, or nothing
  *) GROUP="$1"; shift ;;
esac

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! MODEL_GROUPS=$("$PYTHON" -c "import rl.driver; from models.presets import GROUPS; print(' '.join(GROUPS))" \
                   2>/dev/null); then
  echo "error: $PYTHON cannot import the project (models, rl): run 'bash scripts/setup.sh' to make .venv," \
       "or set PYTHON to an interpreter that has it installed" >&2
  exit 2
fi
if [[ " $MODEL_GROUPS all " != *" $GROUP "* ]]; then
  echo "error: unknown group '$GROUP'; choose one of: $MODEL_GROUPS all" >&2
  exit 2
fi
OUTPUT_DIR="${OUTPUT_DIR:-outputs}"
DATA_DIR="${DATA_DIR:-}"
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

common=("logging.wandb_mode=${WANDB_MODE:-offline}")
if [[ -n "$DATA_DIR" ]]; then
  if [[ -f "$DATA_DIR/train.parquet" && -f "$DATA_DIR/test.parquet" ]]; then
    echo "[data] using $DATA_DIR"
  else
    echo "[data] generating the causal-loop dataset in $DATA_DIR"
    "$PYTHON" -m data.causal_loop --local_dir "$DATA_DIR" --num_samples "$NUM_SAMPLES" --seed "$SEED" --quiet
  fi
  echo "[reward] checking the reward on $DATA_DIR/test.parquet (what the runs evaluate on)"
  "$PYTHON" scripts/score_sample.py "$DATA_DIR/test.parquet"
  evals=$(ls "$DATA_DIR"/test*.parquet | paste -sd, -)
  common+=("data.source=parquet" "data.train_files=[$DATA_DIR/train.parquet]" "data.eval_files=[$evals]")
fi
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
  for g in $MODEL_GROUPS; do
    train_group "$g" "$OUTPUT_DIR/$EXPERIMENT_NAME/$g" "$@"
    runs+=("$OUTPUT_DIR/$EXPERIMENT_NAME/$g")
  done
  echo "[compare] $OUTPUT_DIR/$EXPERIMENT_NAME/comparison.md"
  "$PYTHON" -m rl.compare "${runs[@]}" --out "$OUTPUT_DIR/$EXPERIMENT_NAME"
else
  train_group "$GROUP" "$OUTPUT_DIR/$EXPERIMENT_NAME" "$@"
fi
