#!/usr/bin/env bash
# Check the GPU-only parts of the fast training path on the lent GPU (about 1-2 minutes on an H100;
# most of it is compiling the fused kernels once):
#     bash benchmarks/gpu_check_train.sh            # carry .whl/ so liger-kernel and datasets install
# varlen attention kernels vs masked SDPA (bf16), the compiled fused cross-entropy vs the plain loss (and the
# memory it saves), the compiled lean RMSNorm/SwiGLU vs the modules, Liger's path, 8-bit AdamW, and sft's
# defaults taking the fast path. Each check prints what it measured; then a CPU-sized benchmark smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh
python3 -m pytest -m gpu tests/test_gpu_train.py -q -s -p no:cacheprovider
python3 benchmarks/bench_train.py --tiny --workdir /tmp/bench-train-tiny | grep -E "^(\||==|   ->|lmforge/|data)"
