#!/usr/bin/env bash
# The GPU rows that benchmarks/RESULTS.md lists as "not measured", in one run on one GPU
# (sized for an H100 80GB, about 10 minutes). Run from anywhere:
#
#   bash benchmarks/gpu.sh                  # every job, in priority order, within the budget
#   bash benchmarks/gpu.sh pruning-7b ...   # only the named jobs (see --list)
#   bash benchmarks/gpu.sh --list           # job names, timeouts and command lines
#   bash benchmarks/gpu.sh --check          # parse every command line (CPU, no GPU needed)
#
# Each job runs under `timeout` (its own limit, cut to what is left of GPU_BUDGET_S, default
# 570 s for the whole script); a job that fails or times out is recorded and the next one
# runs; jobs that no longer fit the budget are skipped (rerun them by name). Results:
# benchmarks/results/*_cuda*.json, logs in benchmarks/results/gpu_logs/, a summary at the end
# (also benchmarks/results/gpu_logs/summary.txt). Where $OUT names a folder (the device
# tool), the JSONs, logs and summary are copied there after every job. No network needed:
# every model is built from random weights. PYTHON selects the interpreter (default
# .venv/bin/python if present, else python3).
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
RESULTS=benchmarks/results
LOGS=$RESULTS/gpu_logs
BUDGET_S=${GPU_BUDGET_S:-570}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

NAMES=() LIMITS=() CMDS=() JSONS=()
job() {  # job NAME TIMEOUT_S JSON SCRIPT ARGS...  (JSON: the file the command writes)
    NAMES+=("$1") LIMITS+=("$2") JSONS+=("$3")
    shift 3
    CMDS+=("$(printf '%q ' "$@")")
}

# 1-2. Decoder vs transformers (the fp32 batch-8 row with the causal fast path, issue 8).
job decoder-fp32 90 "$RESULTS/decoder-fastpath_cuda_fp32.json" \
    benchmarks/decoder.py --device cuda --dtype fp32 --repeats 20 --warmup 3 \
    --json "$RESULTS/decoder-fastpath_cuda_fp32.json"
job decoder-bf16 90 "$RESULTS/decoder-fastpath_cuda_bf16.json" \
    benchmarks/decoder.py --device cuda --dtype bf16 --repeats 20 --warmup 3 \
    --json "$RESULTS/decoder-fastpath_cuda_bf16.json"
# 3. Full-size OFT-7B (fused DINOv2+SigLIP, Llama-2-7B shapes, L1 head, chunk 8 x 7), bf16,
#    2 views + proprio: eager vs compile_for_inference(mode="reduce-overhead") (CUDA graphs).
OFT7B=(--device cuda --dtype bf16 --vision openvla --dim 4096 --layers 32 --attn-heads 32
       --kv-heads 32 --mlp-dim 11008 --vocab 32064 --only l1 --batch 1
       --compile-mode reduce-overhead --warmup 3 --repeats 10 --no-memory)
job heads-oft7b-2views 300 "$RESULTS/heads-oft7b-2views_cuda_bf16.json" \
    benchmarks/heads.py "${OFT7B[@]}" --prefix 536 \
    --json "$RESULTS/heads-oft7b-2views_cuda_bf16.json"
# 3b. Full-size pi0 (issue 19; SigLIP x27, Gemma-2B x18, gemma_300m x18, vocab 257152), bf16,
#     batch 1, 1/2/3 cameras: predict_action eager vs one CUDA graph, LeRobot's clone-per-step
#     and re-run loops eager; ms per chunk and peak memory (goal <= 15 ms, one camera).
job pi0-full 75 "$RESULTS/pi0-full_cuda_bf16.json" \
    benchmarks/pi0.py --device cuda --dtype bf16 --layers 18 --vision-layers 27 \
    --vocab 257152 --batch 1 --cameras 1 2 3 --modes cache clone rerun \
    --variants eager graph --no-validation --warmup 3 --repeats 10 \
    --json "$RESULTS/pi0-full_cuda_bf16.json"
# 3c. The compiled 10-step loop (the action expert compiled), 1 camera.
job pi0-full-compiled 90 "$RESULTS/pi0-full-compiled_cuda_bf16.json" \
    benchmarks/pi0.py --device cuda --dtype bf16 --layers 18 --vision-layers 27 \
    --vocab 257152 --batch 1 --cameras 1 --modes cache --variants eager compiled \
    --compile-parts expert --no-validation --warmup 3 --repeats 10 \
    --json "$RESULTS/pi0-full-compiled_cuda_bf16.json"
# 4-5. Vision towers vs timm (re-run after the architecture step).
job vision-fp32 120 "$RESULTS/vision_cuda_fp32.json" \
    benchmarks/vision.py --device cuda --dtype fp32 --batch-sizes 1,8 --runs 15 --warmup 3 \
    --json "$RESULTS/vision_cuda_fp32.json"
job vision-bf16 100 "$RESULTS/vision_cuda_bf16.json" \
    benchmarks/vision.py --device cuda --dtype bf16 --batch-sizes 1,8 --runs 15 --warmup 3 \
    --json "$RESULTS/vision_cuda_bf16.json"
# 6. Training throughput of a ~1B assembly (d 2048 x 16 layers, vocab 32000), bf16.
job training-1b 150 "$RESULTS/training-1b_cuda_bf16.json" \
    benchmarks/training.py --device cuda --dtype bf16 --dim 2048 --layers 16 --heads 16 \
    --mlp-dim 5504 --vocab 32000 --batch 8 --steps 5 --modes plain compile \
    --json "$RESULTS/training-1b_cuda_bf16.json"
# 7. The action-heads table of RESULTS.md on a GPU (small decoder, every head), eager.
job heads-small 150 "$RESULTS/heads_cuda_fp32.json" \
    benchmarks/heads.py --device cuda --no-compile --repeats 5 --warmup 1 \
    --json "$RESULTS/heads_cuda_fp32.json"
# 8. Token pruning at full size: Llama-2-7B's 32 layers, bf16, compiled decoder.
job pruning-7b 240 "$RESULTS/pruning-7b_cuda_bf16.json" \
    benchmarks/pruning.py --device cuda --dtype bfloat16 --layers 32 --compile \
    --batch 1 4 --warmup 2 --repeats 5 --json "$RESULTS/pruning-7b_cuda_bf16.json"
# 9. Full-size OFT-7B, 1 view + proprio.
job heads-oft7b-1view 300 "$RESULTS/heads-oft7b-1view_cuda_bf16.json" \
    benchmarks/heads.py "${OFT7B[@]}" --prefix 280 \
    --json "$RESULTS/heads-oft7b-1view_cuda_bf16.json"

# 10. Serving (issue 20): an OFT-7B-shaped bundle (Llama-2-7B decoder, 1024-wide ViT-L
#     tower) in bf16, L1 and flow heads, 1 and 8 real openpi clients, p50 / p99 per chunk.
job serving-7b 300 "$RESULTS/serving-7b_cuda_bf16.json" \
    benchmarks/serving.py --device cuda --dtype bfloat16 --heads l1,flow --clients 1,8 \
    --vision-dim 1024 --vision-depth 24 --dim 4096 --layers 32 --mlp-dim 11008 \
    --requests 6 --single-requests 8 --repeats 2 --json "$RESULTS/serving-7b_cuda_bf16.json"

# -- selection ------------------------------------------------------------------------------
MODE=run
SELECTED=()
for arg in "$@"; do
    case "$arg" in
        --list) MODE=list ;;
        --check) MODE=check ;;
        -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) SELECTED+=("$arg") ;;
    esac
done
selected() {
    local want
    (( ${#SELECTED[@]} == 0 )) && return 0
    for want in "${SELECTED[@]}"; do [[ "$want" == "$1" ]] && return 0; done
    return 1
}
for want in "${SELECTED[@]}"; do
    found=0
    for name in "${NAMES[@]}"; do [[ "$name" == "$want" ]] && found=1; done
    if (( !found )); then echo "unknown job $want; jobs: ${NAMES[*]}" >&2; exit 2; fi
done

if [[ $MODE == list ]]; then
    for i in "${!NAMES[@]}"; do
        selected "${NAMES[$i]}" && printf '%-20s %4ss  python %s\n' "${NAMES[$i]}" \
            "${LIMITS[$i]}" "${CMDS[$i]}"
    done
    exit 0
fi

if [[ $MODE == check ]]; then  # argparse only: the script stops right after parsing
    bad=0
    for i in "${!NAMES[@]}"; do
        selected "${NAMES[$i]}" || continue
        if eval "\"$PYTHON\" - ${CMDS[$i]}" >/dev/null 2>"/tmp/gpu_sh_check.$$" <<'EOF'
import argparse
import runpy
import sys

parse = argparse.ArgumentParser.parse_args


def parse_and_stop(self, args=None, namespace=None):
    parse(self, args, namespace)
    raise SystemExit(0)


argparse.ArgumentParser.parse_args = parse_and_stop
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
EOF
        then
            echo "parses: ${NAMES[$i]}"
        else
            bad=1
            echo "DOES NOT PARSE: ${NAMES[$i]}"
            tail -n 5 "/tmp/gpu_sh_check.$$"
        fi
    done
    rm -f "/tmp/gpu_sh_check.$$"
    exit $bad
fi

# -- run ------------------------------------------------------------------------------------
mkdir -p "$LOGS"
START=$(date +%s)
SUMMARY=()
FAILED=0

copy_out() {
    [[ -n "${OUT:-}" && -d "${OUT:-}" ]] || return 0
    mkdir -p "$OUT/results" "$OUT/gpu_logs"
    local i
    for i in "${!NAMES[@]}"; do
        [[ -f "${JSONS[$i]}" && "${JSONS[$i]}" -nt "$LOGS/.start" ]] && cp "${JSONS[$i]}" "$OUT/results/"
    done
    cp "$LOGS"/*.log "$LOGS"/summary.txt "$OUT/gpu_logs/" 2>/dev/null
    return 0
}

write_summary() {
    {
        echo "benchmarks/gpu.sh summary ($(date -u +%FT%TZ); budget ${BUDGET_S}s; wall" \
             "$(( $(date +%s) - START ))s)"
        printf '%-20s %-22s %6s  %s\n' job status seconds json
        printf '%s\n' "${SUMMARY[@]}"
    } > "$LOGS/summary.txt"
}

touch "$LOGS/.start"
echo "== nvidia-smi"
nvidia-smi 2>&1 | tee "$LOGS/nvidia-smi.log"
echo "== $PYTHON"
"$PYTHON" -c "import torch, vlakit; print('torch', torch.__version__, '| cuda',
    torch.version.cuda, '| available', torch.cuda.is_available())" 2>&1 | tee "$LOGS/preflight.log"
if ! grep -q "available True" "$LOGS/preflight.log"; then
    echo "preflight failed: no torch with CUDA, or vlakit does not import (see above)"
    SUMMARY+=("$(printf '%-20s %-22s %6s  %s' preflight FAILED 0 -)")
    write_summary; copy_out; cat "$LOGS/summary.txt"
    exit 2
fi

for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]} limit=${LIMITS[$i]} json=${JSONS[$i]}
    selected "$name" || continue
    left=$(( BUDGET_S - ($(date +%s) - START) ))
    if (( left < 45 )); then
        SUMMARY+=("$(printf '%-20s %-22s %6s  %s' "$name" "skipped (budget)" 0 -)")
        echo "== $name: skipped, ${left}s of the budget left"
        continue
    fi
    (( limit > left )) && limit=$left
    echo "== $name (timeout ${limit}s): python ${CMDS[$i]}"
    t0=$(date +%s)
    eval "timeout -k 10 $limit \"$PYTHON\" ${CMDS[$i]}" > "$LOGS/$name.log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT (${limit}s)"; FAILED=$((FAILED + 1)) ;;
        *) status="FAILED (rc $rc)"; FAILED=$((FAILED + 1)) ;;
    esac
    out=-
    if [[ -f "$json" && "$json" -nt "$LOGS/.start" ]]; then out=$json
    elif [[ $rc == 0 ]]; then status="ok, no JSON"; FAILED=$((FAILED + 1)); fi
    tail -n 30 "$LOGS/$name.log"
    echo "-- $name: $status in ${secs}s"
    SUMMARY+=("$(printf '%-20s %-22s %6s  %s' "$name" "$status" "$secs" "$out")")
    write_summary
    copy_out
done

write_summary
copy_out
echo
cat "$LOGS/summary.txt"
(( FAILED == 0 ))
