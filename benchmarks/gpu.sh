#!/usr/bin/env bash
# `make bench-gpu`: T2T-ViT-14, T2T-ViT_t-14 and deit_small_patch16_224 on one GPU, bf16 autocast, batch 128,
# inference and training (forward, backward, AdamW), eager and torch.compile, with peak memory and the GPU's own
# bf16 matmul peak timed in the same rounds. Writes benchmarks/GPU-MODEL-DATE.json and .png.
# Budget: under 5 minutes on one H100/H200, most of it compiling (JSON is rewritten after every run).
#
#   benchmarks/gpu.sh                    # the GPU run
#   benchmarks/gpu.sh --device cpu       # the same code path at toy sizes on a CPU (--smoke), for a machine
#                                        # without a GPU; writes ...-smoke.json
#   benchmarks/gpu.sh --ab all           # also each T2T-ViT with every fast path off, side by side
# Any other `t2tvit benchmark` option overrides the preset. PYTHON=... picks the interpreter (default: .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
smoke=()
prev=
for arg in "$@"; do
    if [ "$arg" = "--device=cpu" ] || { [ "$prev" = "--device" ] && [ "$arg" = "cpu" ]; }; then smoke=(--smoke); fi
    prev=$arg
done
exec "$py" -m t2tvit benchmark --preset gpu ${smoke[@]+"${smoke[@]}"} "$@"
