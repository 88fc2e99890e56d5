#!/usr/bin/env bash
# Every GPU acceptance check in one command, for a CUDA machine:
#   the *_gpu.py tests (bf16/fp16 steps, no host sync in bf16, fp16 overflow skip,
#   unscaled grad-norm logging, bitwise resume with CUDA RNG and GradScaler state)
#   and the lab in bf16 and fp16 (epoch times and accuracy for benchmarks/RESULTS.md).
# Usage: bash benchmarks/gpu_checks.sh   (PY=python to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
echo "== $(date -u +%F) $($PY -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)')"
$PY -m pytest -q -p no:cacheprovider -m gpu tests
for precision in bf16 fp16; do
  echo "== lab --device cuda --precision $precision"
  $PY examples/fashion_mnist.py --run-dir "runs/gpu-lab-$precision" --device cuda --precision "$precision"
  $PY - "$precision" <<'PY'
import json, sys
s = json.load(open(f"runs/gpu-lab-{sys.argv[1]}/summary.json"))
print(f"{sys.argv[1]}: dataset {s['dataset']}, best {s['metric']} {s['best_metric']:.4f}, "
      f"epoch times {s['wall_time_per_epoch_s']}, {s['samples_per_s']} samples/s, skipped {s['skipped_steps']}")
PY
done
