#!/usr/bin/env bash
# The device checks in one call, most needed first (about 8-9 minutes on one H100; each step has its own
# time limit, so a slow one cannot starve the rest):
#   1. one CSR iteration on llava-1.5-7b-shaped random weights (recipes/real_size_check.py: time per prompt);
#   2. the test suite, whose GPU tests (CUDA graphs, bf16, NCCL-free paths) run only where CUDA is;
#   3. the decode and training benchmarks at 7B shapes (docs/BENCHMARKS.md's GPU rows).
# Logs and JSON go to $OUT (the device tool brings them back) or runs/gpu-checks.
#     bash recipes/gpu_checks.sh
set -u -o pipefail
out=${OUT:-runs/gpu-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=$(command -v python3 || command -v python)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"

timeout 300 $py recipes/real_size_check.py --prompts 8 --work /tmp/real-size-check 2>&1 | tee "$out/real_size_check.log"
timeout 150 $py -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/tests.log"
timeout 90 $py recipes/bench_decode.py --preset llava-1.5-7b --dtype bfloat16 2>&1 | tee "$out/bench_decode.log"
timeout 60 $py recipes/bench_train.py --preset llava-1.5-7b --lora-r 128 --seq 1024 --dtype bfloat16 2>&1 \
    | tee "$out/bench_train.log"
echo "done"
