#!/usr/bin/env bash
# Reruns every figure that README.md and docs/results/ quote, and rewrites docs/results/.
#
#   bash scripts/reproduce.sh                 # every step (about 2 h on 2 otherwise idle cores)
#   bash scripts/reproduce.sh --quick         # eval on the scene test split, quick bench, check cost,
#                                             # prefill speed (about 35 min)
#   bash scripts/reproduce.sh --steps bench,check_cost
#   bash scripts/reproduce.sh --python /path/to/python   # default: .venv/bin/python (scripts/setup.sh)
#
# Steps, in order: data eval_test eval_dev eval_easyvqa calibrate front bench bench_half bench_timing
# check_cost prefill_speed throughput throughput_gqa throughput_organism analysis. Inputs go to runs/ (git-ignored); each step's log to runs/reproduce/.
# docs/results/MANIFEST.tsv gets one line per file written: file, step, command, commit, finish
# time (UTC) and seconds. `calibrate` writes runs/calibrated_config.json; it does not replace the
# shipped config (visipruner/models/organism/visipruner_config.json), which the bench uses.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=.venv/bin/python
STEPS=(data eval_test eval_dev eval_easyvqa calibrate front bench bench_half bench_timing check_cost prefill_speed
       throughput throughput_gqa throughput_organism analysis)
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) STEPS=(data eval_test bench check_cost prefill_speed) ;;
    --steps) IFS=, read -r -a STEPS <<< "$2"; shift ;;
    --python) PY=$2; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "reproduce.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -x "$PY" ] || { echo "reproduce.sh: no python at $PY: run scripts/setup.sh or pass --python" >&2; exit 2; }
# this checkout's visipruner, also for the scripts under benchmarks/ and scripts/
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
R=docs/results
LOGS=runs/reproduce
mkdir -p "$R" "$LOGS" runs/data
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain 2>/dev/null)" ] || COMMIT="$COMMIT+changes"
CLI=("$PY" -m visipruner.cli)

# run STEP "FILE ..." COMMAND...: runs COMMAND (stdout+stderr to runs/reproduce/STEP.log) and
# records each FILE in the manifest with the command that wrote it.
run() {
  local step=$1 files=$2; shift 2
  local cmd="$*" t0=$SECONDS
  echo "[$(date -u +%H:%M:%S)] $step: $cmd"
  "$@" > "$LOGS/$step.log" 2>&1 || { echo "reproduce.sh: step $step failed; see $LOGS/$step.log" >&2; exit 1; }
  local secs=$((SECONDS - t0)) now f
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  touch "$R/MANIFEST.tsv"
  for f in $files; do
    awk -F'\t' -v f="$f" '$1 != f' "$R/MANIFEST.tsv" > "$R/MANIFEST.tsv.tmp"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$f" "$step" "${cmd//$PY/python}" "$COMMIT" "$now" "$secs" >> "$R/MANIFEST.tsv.tmp"
    sort -o "$R/MANIFEST.tsv" "$R/MANIFEST.tsv.tmp" && rm -f "$R/MANIFEST.tsv.tmp"
  done
}

# a text figure: the command on the first line, then its output
to_text() {
  local out=$1; shift
  { echo "\$ ${*//$PY/python}"; "$@"; } > "$out"
}

for step in "${STEPS[@]}"; do
  case "$step" in
    data)
      [ -f runs/organism_hf/config.json ] || run organism_hf "" "$PY" -c \
        "from visipruner.models import load_organism; m, p = load_organism(); m.save_pretrained('runs/organism_hf'); p.save_pretrained('runs/organism_hf')"
      run data_test "" "$PY" -m visipruner.data.scenes --split test --n 600 --seed 0 --out runs/data/scenes
      run data_dev "" "$PY" -m visipruner.data.scenes --split dev --n 600 --seed 0 --out runs/data/scenes
      run data_easyvqa "" "$PY" -m visipruner.data.easyvqa --split test --out runs/data/easyvqa
      run data_calib "" "$PY" scripts/calibration_data.py --out runs/calib ;;
    eval_test)
      run eval_test "$R/eval_scenes_test600.json" "${CLI[@]}" eval --data runs/data/scenes/test.jsonl \
        --json "$R/eval_scenes_test600.json" --no-progress ;;
    eval_dev)
      run eval_dev "$R/eval_scenes_dev600.json" "${CLI[@]}" eval --data runs/data/scenes/dev.jsonl \
        --json "$R/eval_scenes_dev600.json" --no-progress ;;
    eval_easyvqa)
      run eval_easyvqa "$R/eval_easyvqa_test600.json" "${CLI[@]}" eval --data runs/data/easyvqa/easyvqa_test.jsonl \
        --sample 600 --seed 0 --json "$R/eval_easyvqa_test600.json" --no-progress ;;
    calibrate)
      run calibrate "$R/calibrate.json $R/calibrate.png $R/calibrate.txt" to_text "$R/calibrate.txt" \
        "${CLI[@]}" calibrate --model runs/organism_hf --data runs/calib/calib.jsonl \
        --heldout runs/calib/heldout.jsonl --target agreement=0.9 --out runs/calibrated_config.json \
        --json "$R/calibrate.json" ;;
    front)
      run front "$R/cfg_front050.json" "$PY" scripts/front_config.py "$R/calibrate.json" --flops 0.46 0.50 \
        --out "$R/cfg_front050.json" ;;
    bench)
      run bench "$R/bench.json $R/bench.png $R/bench_quick.txt" to_text "$R/bench_quick.txt" \
        "${CLI[@]}" bench --quick --json "$R/bench.json" ;;
    bench_half)
      run bench_half "$R/bench_half.json $R/bench_half.png $R/bench_half.txt" to_text "$R/bench_half.txt" \
        "${CLI[@]}" bench --quick --visipruner-config "$R/cfg_front050.json" \
        --methods visipruner,fastv,pdrop,dart,sparsevlm --json "$R/bench_half.json" ;;
    bench_timing)
      run bench_timing "$R/bench_timing_check.json $R/bench_timing_check.png $R/bench_timing_check.txt" \
        to_text "$R/bench_timing_check.txt" "${CLI[@]}" bench --quick --methods visipruner,pdrop --limit 8 \
        --threads 1 --json "$R/bench_timing_check.json" ;;
    check_cost)
      run check_cost "$R/check_cost.json" "$PY" benchmarks/check_cost.py --json "$R/check_cost.json" ;;
    prefill_speed)
      run prefill_speed "$R/prefill_speed_1thread.json" "$PY" benchmarks/prefill_speed.py --threads 1 \
        --repeats 5 --decode-steps 8 --json "$R/prefill_speed_1thread.json" ;;
    throughput)  # batched generation on the LLaVA-1.5-shaped random model (multi-head attention, as LLaVA-1.5)
      run throughput "$R/throughput.json $R/throughput.png" "$PY" benchmarks/throughput.py --batch-sizes 1,4,16 \
        --repeats 3 --threads 2 --json "$R/throughput.json" ;;
    throughput_gqa)  # the same with grouped-query attention (8 KV heads for 16 query heads): a smaller cache
      run throughput_gqa "$R/throughput_gqa.json $R/throughput_gqa.png" "$PY" benchmarks/throughput.py \
        --batch-sizes 1,4,16 --kv-heads 8 --settings paper --repeats 3 --threads 2 --json "$R/throughput_gqa.json" ;;
    throughput_organism)
      run throughput_organism "$R/throughput_organism.json $R/throughput_organism.png" "$PY" benchmarks/throughput.py \
        --organism --batch-sizes 1,4,16 --repeats 3 --threads 2 --json "$R/throughput_organism.json" ;;
    analysis)
      run analysis "$R/analysis/analysis.json $R/analysis/report.html $R/analysis/suggested_config.json" \
        "${CLI[@]}" analyze --model runs/organism_hf --data runs/calib/heldout.jsonl --limit 10 --stride 2 \
        --config visipruner/models/organism/visipruner_config.json --out "$R/analysis" ;;
    *) echo "reproduce.sh: unknown step $step" >&2; exit 2 ;;
  esac
done
echo "done: $R (manifest: $R/MANIFEST.tsv, logs: $LOGS/)"
