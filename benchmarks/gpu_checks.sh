#!/usr/bin/env bash
# Every GPU acceptance check in one command, for a CUDA machine (sized for under 8 minutes on an H100/H200;
# not yet timed on one):
#   1. the GPU tests, tests/**/*_gpu.py: bf16/fp16 steps, no host sync in steady-state bf16
#      iterations, fp16 overflow skip, unscaled grad-norm logging, bitwise resume with CUDA RNG
#      and GradScaler state;
#   2. benchmarks/run.py --device cuda: every model (mlp, cnn, resnet18, gpt) in bf16 and fp16,
#      every runner, with peak memory and host syncs per iteration;
#   3. benchmarks/checkpoint_save.py --device cuda: torch.save, DCP async_save, Lightning's async IO and
#      engine_kit sync/async saves of a 25.2M-parameter model (302 MB) side by side (~1 min estimated, no memory rows;
#      its JSON goes next to run.py's, *-checkpoint-save.json);
# and prints the JSON and the tables that benchmarks/RESULTS.md records.
#
# Usage: bash benchmarks/gpu_checks.sh                 # on a CUDA machine
#        bash benchmarks/gpu_checks.sh --device cpu    # proves the script on a CPU-only machine
#                                                      # (GPU tests skip; CPU-sized benchmark)
# Environment: PY (interpreter; default .venv/bin/python, else python3),
#              GPU_CHECKS_DEVICE (cuda|cpu, same as --device), GPU_CHECKS_JSON (where the JSON goes).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE="${GPU_CHECKS_DEVICE:-cuda}"
if [[ "${1:-}" == "--device" && -n "${2:-}" ]]; then DEVICE="$2"; fi
if [[ "$DEVICE" != "cuda" && "$DEVICE" != "cpu" ]]; then echo "--device must be cuda or cpu, not $DEVICE" >&2; exit 2; fi
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
JSON="${GPU_CHECKS_JSON:-benchmarks/results/$(date -u +%F)-$DEVICE-gpu-checks.json}"
status=0

echo "== $(date -u '+%F %T UTC') device=$DEVICE commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
$PY - <<'PY'
import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {name}")
PY

echo "== GPU tests: $(find tests -name '*_gpu.py' | sort | tr '\n' ' ')"
# shellcheck disable=SC2046
$PY -m pytest -q -p no:cacheprovider -rs $(find tests -name '*_gpu.py' | sort) || status=1

echo "== benchmarks/run.py --device $DEVICE"
if [[ "$DEVICE" == "cuda" ]]; then
  $PY benchmarks/run.py --device cuda --repeats 3 --json "$JSON" || status=1
else
  # The CPU proof: the same code path at a size that takes a minute or two.
  $PY benchmarks/run.py --device cpu --only mlp --repeats 1 --epochs 1 --threads 1 --json "$JSON" || status=1
fi

echo "== benchmarks/checkpoint_save.py --device $DEVICE (on cpu: --smoke)"
# On CUDA without the per-row memory subprocesses (each pays a CUDA start-up; host memory is measured on the CPU run).
$PY benchmarks/checkpoint_save.py --device "$DEVICE" --repeats 3 --loop-repeats 2 $([[ "$DEVICE" == cpu ]] && echo --smoke || echo --no-memory) --json "${JSON%.json}-checkpoint-save.json" || status=1

echo "== JSON ($JSON)"
cat "$JSON" 2>/dev/null || { echo "no JSON written"; status=1; }
echo "== exit status $status"
exit $status
