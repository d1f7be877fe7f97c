#!/usr/bin/env bash
# A small fixed run of the whole pipeline, for checking that a change keeps behaviour: data,
# a few GRPO steps of each stage from the shipped kk-tiny base, evaluation and every report
# analysis on tiny settings. Prints one sha1 per product (data, training metrics, weights,
# evaluation, trends); run it before and after a change on the same machine and compare.
#
#   bash scripts/fixed_run.sh [OUT]        # OUT defaults to a new temporary folder
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
export KKLAB_CACHE="$OUT/cache" TOKENIZERS_PARALLELISM=false
cat > "$OUT/schedule.yaml" <<YAML
run: fixed
preset: kk-tiny
loss_type: dapo
data: {root: $OUT/data, train_per_size: 20, test_per_size: 5, seed: 0}
stages:
  stage1: {people: [3], batch_prompts: 2, rollout_n: 2, temperature: {start: 1.0}, lr: {start: 4.0e-4},
           max_prompt_length: 512, max_response_length: 160, steps: 2, save_every: 1}
  stage2: {people: [4], batch_prompts: 2, rollout_n: 2, temperature: {start: 1.2}, lr: {start: 2.0e-4},
           max_prompt_length: 640, max_response_length: 160, steps: 1, save_every: 1}
  stage3: {people: [3, 4], batch_prompts: 2, rollout_n: 2, temperature: {start: 1.2, end: 0.9},
           lr: {start: 1.0e-4, end: 5.0e-5}, max_prompt_length: 640, max_response_length: 160, steps: 2,
           save_every: 1, segments: 2}
YAML
reg=(--registry "$OUT/ckpts.yaml")
$PY -m train.run stage3 --schedule "$OUT/schedule.yaml" "${reg[@]}" --runs-dir "$OUT/runs" --quiet
$PY -m analysis eval --run fixed "${reg[@]}" --people 3 --n-per-size 4 --max-new-tokens 160 \
    --out "$OUT/eval" --cache "$OUT/results" 2>/dev/null
$PY -m analysis report --run fixed "${reg[@]}" --every 2 --puzzle-sizes 3 --puzzles-per-size 2 \
    --max-new-tokens 160 --out "$OUT/reports" --cache "$OUT/results" 2>/dev/null || true
digest() { cat "$@" | sha1sum | cut -c1-12; }
echo "data      $(digest $(find "$OUT/data" -name '*.parquet' | sort))"
echo "training  $($PY -c 'import json,sys; print(json.dumps([{k: v for k, v in json.loads(l).items() if k != "time"} for l in open(sys.argv[1])]))' "$OUT/runs/fixed/metrics.jsonl" | sha1sum | cut -c1-12)"
echo "weights   $(digest $(find "$OUT/runs/fixed" -name model.safetensors | sort))"
echo "eval      $($PY -c 'import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps([[c["checkpoint"], c["accuracy"], c["mean_response_tokens"], c["format_error_rate"]] for c in r["checkpoints"]]))' "$OUT/eval/eval.json" | sha1sum | cut -c1-12)"
echo "trends    $(sha1sum "$OUT/reports/trends.csv" | cut -c1-12)"
echo "outputs in $OUT"
