"""What importing Lightning does to every other loop in the process: ``PYTORCH_NVML_BASED_CUDA_CHECK``.

Lightning's import sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` for the whole
process. With it, ``torch.cuda.is_available()`` asks NVML each time instead of
the CUDA runtime's cached answer; on a machine without a GPU that is a failed
library load per call. torch calls it once per optimizer step (the optimizer's
accelerator check), so any small model trained in a process that imported
Lightning runs slower, whatever loop trains it. ``run.py`` therefore gives that
environment only to its Lightning runners (``runners.import_lightning``).

This script measures, each in a fresh interpreter, interleaved over
``--repeats`` rounds: ``torch.cuda.is_available()`` per call, and a plain
PyTorch step (the MLP of ``run.py``, batch 16, AdamW, one optimizer step per
micro-batch) per step, with the variable unset and set::

    .venv/bin/python benchmarks/lightning_environ.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PROBE = """
import json, time, timeit, torch
torch.set_num_threads(1)
call_us = min(timeit.repeat("torch.cuda.is_available()", globals=globals(), number=2000, repeat=3)) / 2000 * 1e6
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
optimizer = torch.optim.AdamW(model.parameters())
x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
def steps(n):
    start = time.perf_counter()
    for _ in range(n):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / n * 1e6
steps(200)
print(json.dumps({"is_available_us": call_us, "step_us": min(steps(1000) for _ in range(3))}))
"""

VARIABLE = "PYTORCH_NVML_BASED_CUDA_CHECK"


def probe(with_variable: bool) -> dict[str, float]:
    """One fresh interpreter's timings, with the variable set to "1" or unset."""
    env = {name: value for name, value in os.environ.items() if name != VARIABLE}
    if with_variable:
        env[VARIABLE] = "1"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (one fresh interpreter each way per round)")
    args = parser.parse_args(argv)
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for round_ in range(args.repeats):
        for with_variable in ((False, True) if round_ % 2 == 0 else (True, False)):
            results[with_variable].append(probe(with_variable))
    print(f"| {VARIABLE} | is_available() µs/call | plain MLP step µs |")
    print("|---|---|---|")
    for with_variable, rows in results.items():
        call = statistics.median(r["is_available_us"] for r in rows)
        step = statistics.median(r["step_us"] for r in rows)
        print(f"| {'1 (what importing Lightning sets)' if with_variable else 'unset'} | {call:.1f} | {step:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
