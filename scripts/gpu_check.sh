#!/usr/bin/env bash
# The GPU readiness check (mm/app/gpu_check.py): attention kernels, a real-shape LM step, FSDP2 on one process,
# the image stage's memory at the 11B shape, and every demo stage in bf16; each asserted, figures in
# OUT/gpu_check.json. About 6-8 minutes on one H100 (8 minutes at most: it stops itself there).
#
#   scripts/gpu_check.sh OUT [--only CHECK ...] [--steps N]
#
# Runs from a plain checkout with the machine's own python3 (PYTHON=... picks another): no virtualenv, no
# install. The project is imported from this source tree; what the machine lacks comes from a folder of wheels
# (WHEELS=DIR, default .gpu-wheels beside this folder: `make gpu-wheels` downloads them for Python 3.12),
# installed into a temporary folder. Without espeak-ng the speech stages are skipped, saying so.
# GPU_CHECK_CPU=1 runs it at tiny shapes on the CPU (what its test does).
# Exit status: 0 all passed, 1 a check failed, 2 no CUDA GPU (or no torch), 124 out of time.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python3}"
limit="${GPU_CHECK_SECONDS:-480}"
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: scripts/gpu_check.sh OUT [--only CHECK ...] [--steps N]" >&2
    exit 2
fi
out="$1"
shift

extra=()
if [[ "${GPU_CHECK_CPU:-0}" == "1" ]]; then  # the script itself at tiny shapes on the CPU (its test)
    extra+=(--cpu)
elif ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU is visible to $python (torch missing, or torch.cuda.is_available() is False): run it on a machine with an NVIDIA GPU" >&2
    exit 2
fi

site="$(mktemp -d -t mm-gpu-check.XXXXXX)"
trap 'rm -rf "$site"' EXIT
wheels="${WHEELS:-$root/.gpu-wheels}"
if compgen -G "$wheels/*.whl" >/dev/null; then
    echo "gpu_check.sh: installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site/deps"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site/deps" "$wheels"/*.whl \
        || { echo "gpu_check.sh: could not install the wheels of $wheels" >&2; exit 1; }
fi

# The package as it installs (mm/ with the rooms beside it as mm.lm, mm.encoders, ...), made of links to this tree.
mkdir -p "$site/src/mm"
for f in "$root"/mm/*; do ln -s "$f" "$site/src/mm/$(basename "$f")"; done
for room in lm encoders adapters datasets world configs; do ln -s "$root/$room" "$site/src/mm/$room"; done
export PYTHONPATH="$site/src:$site/deps${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

command -v espeak-ng >/dev/null || extra+=(--no-speech)
mkdir -p "$out"
timeout --signal=INT --kill-after=30 "$limit" "$python" -m mm.app.gpu_check "$out" "${extra[@]}" "$@"
rc=$?
if [[ $rc -eq 124 ]]; then
    echo "gpu_check.sh: stopped after $limit s; what was measured is in $out/gpu_check.json" >&2
fi
exit $rc
