#!/usr/bin/env bash
# Every GPU test and benchmark of the project in one go, for the few minutes a GPU machine is lent:
#
#     OUT=/tmp/gpu-out bash bench/gpu.sh [--tokenizer DIR] [--deadline SECONDS] [--only STEP,...]
#
# Steps, most important first, each with its own limit and all of them inside --deadline (default 450 s):
#   tests     pytest -m gpu (every kernel against the float reference, the GPU decoder, online Hadamard + kernel)
#   kernels   bench/kernels.py: GEMV time, GB/s and speed-up over fp16 for every layout the kernels serve
#   frontier  `compress run` of w3-frontier-table8 (GPTVQ 3-bit + 8-bit embeddings + PEQA) with --device cuda on a
#             random-weight SmolLM2-135M-shaped model (time and the code paths on a GPU; quality is meaningless)
#   rotate    an online-Hadamard recipe (rotate + GPTQ 4-bit) the same way
#   decode    bench/decode.py: greedy tokens/s of that model in fp16 and of both checkpoints (kernels on the GPU)
#   scale     bench/scale.py --device cuda --only 1B: time and memory of RTN / GPTQ on a random 1B Llama
# The random models need SmolLM2's tokenizer: --tokenizer DIR (a folder AutoTokenizer reads) where the offline
# model is not installed. Each step writes OUT/STEP.log; the frontier report and the scale rows are copied to OUT.
# A machine without pydantic (the device image of this workplace): install its wheels (pydantic, pydantic-core,
# annotated-types, typing-inspection, for that machine's Python) into a folder on PYTHONPATH first.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/compress-gpu}
TOKENIZER="" DEADLINE=450 ONLY=""
while [ $# -gt 0 ]; do
    case $1 in
        --tokenizer) TOKENIZER=$2; shift 2 ;;
        --deadline) DEADLINE=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        *) echo "unknown argument $1 (take --tokenizer DIR, --deadline SECONDS, --only STEP,...)" >&2; exit 2 ;;
    esac
done
PY=${PY:-python3}
WORK=${WORK:-/tmp/compress-gpu-work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
START=$(date +%s)

step() {  # step NAME LIMIT 'COMMAND': run unless --only leaves it out, within what is left of the deadline
    local name=$1 limit=$2 cmd=$3
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
    local left=$((DEADLINE - ($(date +%s) - START)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then echo "== $name: skipped (deadline)"; return 0; fi
    echo "== $name (limit ${limit} s): $cmd"
    local t0=$(date +%s)
    timeout "$limit" bash -c "$cmd" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $(($(date +%s) - t0)) s"
    tail -n 30 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
$PY -c "import torch, cupy, transformers; print('torch', torch.__version__, 'cupy', cupy.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())"

TIME=$(command -v /usr/bin/time > /dev/null && echo "/usr/bin/time -v")
run_recipe() {  # run_recipe NAME RECIPE [--set ...]: compress the random 135M model on the GPU
    local name=$1 recipe=$2
    shift 2
    $PY -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import scale
scale.make_model('135M', Path('$WORK'), Path('$TOKENIZER') if '$TOKENIZER' else None)" || return 1
    rm -rf "${WORK:?}/$name"
    $TIME $PY -m compress.cli run "$recipe" "$WORK/135M" --device cuda --out "$WORK/$name" --keep-failed "$@"
    local rc=$?
    [ -f "$WORK/$name/report.json" ] && cp "$WORK/$name/report.json" "$OUT/$name-report.json"
    return $rc
}
export -f run_recipe
export PY WORK OUT TOKENIZER TIME
cat > "$WORK/rotate.yaml" <<'EOF'
name: gpu-rotate
calibration: {dataset: pydoc, samples: 32, seq_len: 512}
passes:
  - {type: rotate, online: true}
  - {type: gptq, bits: 4, group_size: 64}
EOF

step tests 240 "$PY -m pytest -m gpu -p no:cacheprovider -q -rA --durations=15 tests/test_kernels.py \
    tests/test_rotation.py"
step kernels 90 "$PY bench/kernels.py --peak-gbs 4800"
step frontier 150 "run_recipe frontier recipes/w3-frontier-table8.yaml --set calibration.samples=32 \
    --set passes.2.epochs=1"
step rotate 60 "run_recipe rotate $WORK/rotate.yaml"
step decode 60 "$PY bench/decode.py $WORK/135M $WORK/frontier $WORK/rotate --tokens 64"
step scale 120 "$PY bench/scale.py --device cuda --only 1B ${TOKENIZER:+--tokenizer $TOKENIZER} --models $WORK/scale"
cp bench/results/scale.jsonl "$OUT/scale.jsonl" 2>/dev/null
echo "== done after $(($(date +%s) - START)) s"
