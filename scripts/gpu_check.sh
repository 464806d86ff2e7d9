#!/usr/bin/env bash
# Every training stage for a few steps in bf16 on a GPU, with the real kernels (flash / cuDNN attention, fused
# AdamW, FlexAttention for packed rows), on a tiny shapes world; one line of figures per stage: step time,
# tokens/s, MFU (against a bf16 matmul), peak CUDA memory, last loss, parameter dtypes.
#
#   scripts/gpu_check.sh [OUT]            one GPU (default OUT: a new temporary folder)
#   NPROC=4 scripts/gpu_check.sh [OUT]    each stage under torchrun on 4 GPUs (FSDP2, MixedPrecisionPolicy)
#   STEPS=20 COMPILE=1 scripts/gpu_check.sh   more steps; torch.compile every block
#
# Needs CUDA (it stops at once without it) and espeak-ng (the spoken world). PYTHON picks the interpreter
# (default: the project's .venv, else python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
out="${1:-$(mktemp -d -t mm-gpu-check.XXXXXX)}"
steps="${STEPS:-10}"
nproc="${NPROC:-1}"
extra=()
if [[ "${COMPILE:-0}" == "1" ]]; then extra+=(--compile); fi

gpus="$("$python" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if [[ "$gpus" -lt 1 ]]; then
    echo "gpu_check.sh: no CUDA GPU is visible to $python (torch.cuda.is_available() is False); run it on a GPU machine" >&2
    exit 2
fi
if [[ "$gpus" -lt "$nproc" ]]; then
    echo "gpu_check.sh: NPROC=$nproc but only $gpus GPU(s) are visible" >&2
    exit 2
fi

echo "gpu_check.sh: $nproc process(es), $steps steps per stage, output in $out"
cd "$root"
if [[ "$nproc" -gt 1 ]]; then
    torchrun="$(dirname "$python")/torchrun"
    exec "$torchrun" --standalone --nproc-per-node "$nproc" scripts/gpu_check.py "$out" --steps "$steps" "${extra[@]}"
fi
exec "$python" scripts/gpu_check.py "$out" --steps "$steps" "${extra[@]}"
