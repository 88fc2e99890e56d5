"""What the loop doctor costs: the standard stack with ``doctor=True`` vs ``doctor=False``, side by side.

Two workloads, each run with the doctor off and on, in interleaved repeats
(every repeat runs both, in alternating order, so load from other processes
hits both alike); the table gives the median over repeats of the whole run's
time per iteration, the min–max and the on/off ratio:

- ``host``: the host-bound case of ``host_overhead.py`` (``nn.Linear(8, 1)``,
  batches of 8, SGD), where any per-iteration Python work would show; 500
  iterations per epoch, 6 epochs (3,000 iterations, as there), validation
  each epoch, accumulation 1 and 4.
- ``lab``: the lab's CNN and recipe (batch 32 x accumulation 4, AdamW with
  decay on weights only, OneCycleLR, clipping at 10.0) on random 28x28
  images, 45 micro-batches per epoch (the offline lab's epoch), validation
  each epoch; reported as samples per second.

Building engines is not timed; the whole ``trainer.run`` (validation,
flushes, the doctor's checks before the first step and at epoch ends) is,
three ways: wall time, the process's CPU time (steadier on a CPU shared with
other jobs: waiting for the CPU is not counted) and, with the doctor on, the
time spent inside the doctor's own handlers (each timed by a wrapper), as a
share of the run's CPU time: the doctor's cost measured directly.

    python benchmarks/doctor_cost.py                  # the measurement (~2 minutes on 2 busy cores)
    python benchmarks/doctor_cost.py --smoke          # seconds; numbers meaningless
    python benchmarks/doctor_cost.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import functools
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from ignite.metrics import Accuracy, MeanSquaredError

from engine_kit import create_evaluator, create_trainer
from engine_kit.doctor import decay_groups
from handlers import Doctor, attach_scheduler, attach_standard

from _env import describe, environment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from fashion_mnist import make_model as lab_model  # noqa: E402 - the lab's own CNN, not a copy

Runner = Callable[[], tuple[int, Any]]  # runs once: the samples it trained on, and its TimedDoctor
DOCTOR_HANDLERS = ("_before_first_step", "_batch_requested", "_batch_fetched", "_gradients_ready",
                   "_after_validation", "_after_epoch", "_finish")


class TimedDoctor(Doctor):
    """A Doctor whose event handlers add the time they take to ``spent`` (set before ``attach`` registers them)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.spent = 0.0
        for name in DOCTOR_HANDLERS:
            setattr(self, name, self._timed(getattr(self, name)))

    def _timed(self, handler: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(handler)
        def timed(*args: Any) -> None:
            start = time.thread_time()  # CPU time of this thread: waiting for a busy CPU is not counted
            try:
                handler(*args)
            finally:
                self.spent += time.thread_time() - start

        return timed


def attach_stack(trainer: Any, evaluator: Any, val: Any, workdir: Path, doctor: bool, **options: Any) -> TimedDoctor | None:
    """attach_standard without its doctor, plus a TimedDoctor in the doctor's place when ``doctor``."""
    stack = attach_standard(trainer, evaluator, val, run_dir=workdir, checkpoint_every_steps=None, keep_best=0,
                            resume=None, doctor=False, **options)
    stack.checkpoints.at_epoch_end = False  # no file writes: what is timed is the handlers' own work
    if not doctor:
        return None
    timed = TimedDoctor(path=workdir / "doctor.json")
    timed.attach(trainer)  # after the checkpoint handler, unlike attach_standard: the same work either way
    return timed


def host_case(epoch_length: int, epochs: int, accumulation: int) -> Callable[[Path, bool], Runner]:
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 8, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(epoch_length + 2)]
    data, val = data[:epoch_length], data[epoch_length:]  # validation held out (the doctor checks that)

    def build(workdir: Path, doctor: bool) -> Runner:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)
        trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=1e-3), F.mse_loss,
                                 accumulation_steps=accumulation)
        evaluator = create_evaluator(model, metrics={"mse": MeanSquaredError()})
        timed = attach_stack(trainer, evaluator, val, workdir, doctor, metric="mse", mode="min")
        return lambda: (trainer.run(data, max_epochs=epochs).iteration * 8, timed)

    return build


def lab_case(epoch_length: int, epochs: int) -> Callable[[Path, bool], Runner]:
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen))
            for _ in range(epoch_length)]
    val = [(torch.randn(256, 1, 28, 28, generator=gen), torch.randint(0, 10, (256,), generator=gen))]

    def build(workdir: Path, doctor: bool) -> Runner:
        torch.manual_seed(0)
        model = lab_model()
        optimizer = torch.optim.AdamW(decay_groups(model, weight_decay=0.01), lr=1e-3)
        trainer = create_trainer(model, optimizer, F.cross_entropy, accumulation_steps=4, max_grad_norm=10.0)
        steps = -(-epoch_length // 4) * epochs
        attach_scheduler(trainer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps))
        evaluator = create_evaluator(model, metrics={"accuracy": Accuracy()})
        timed = attach_stack(trainer, evaluator, val, workdir, doctor, log_every=25)
        return lambda: (trainer.run(data, max_epochs=epochs).iteration * 32, timed)

    return build


def measure(name: str, build: Callable[[Path, bool], Runner], repeats: int, root: Path) -> dict[str, Any]:
    """Interleaved repeats of the doctor off and on: wall and CPU seconds per sample, the doctor's CPU share."""
    samples: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    shares: list[float] = []
    counter = 0
    for r in range(repeats + 1):  # repeat 0 warms up (lazy imports, allocator) and is dropped
        for doctor in ((False, True) if r % 2 else (True, False)):
            counter += 1
            workdir = root / f"{counter:04d}-{name}-{int(doctor)}"
            runner = build(workdir, doctor)
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            count, timed = runner()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            shutil.rmtree(workdir, ignore_errors=True)
            if r:
                samples[doctor].append(elapsed / count)
                cpu[doctor].append(elapsed_cpu / count)
                if timed is not None:
                    shares.append(timed.spent / elapsed_cpu)
    off, on = statistics.median(samples[False]), statistics.median(samples[True])
    cpu_off, cpu_on = statistics.median(cpu[False]), statistics.median(cpu[True])
    return {"case": name, "off_s_per_sample": off, "on_s_per_sample": on, "ratio": on / off,
            "cpu_ratio": cpu_on / cpu_off, "doctor_share": statistics.median(shares),
            "doctor_share_max": max(shares), "samples_off": samples[False], "samples_on": samples[True],
            "cpu_off": cpu[False], "cpu_on": cpu[True]}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | doctor off | doctor on | min–max off | min–max on | on / off (wall) | on / off (CPU) "
             "| doctor's own time (median, max) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["case"].startswith("lab"):
            fmt: Callable[[float], str] = lambda s: f"{1 / s:,.0f} samples/s"  # noqa: E731
        else:
            fmt = lambda s: f"{s * 8e6:.1f} µs/iter"  # noqa: E731 - 8 samples per iteration
        spread = [f"{fmt(max(row[k]))}–{fmt(min(row[k]))}".replace(" samples/s–", "–").replace(" µs/iter–", "–")
                  for k in ("samples_off", "samples_on")]
        lines.append(f"| {row['case']} | {fmt(row['off_s_per_sample'])} | {fmt(row['on_s_per_sample'])} | "
                     f"{spread[0]} | {spread[1]} | {(row['ratio'] - 1) * 100:+.2f} % | "
                     f"{(row['cpu_ratio'] - 1) * 100:+.2f} % | {row['doctor_share'] * 100:.3f} %, "
                     f"{row['doctor_share_max'] * 100:.3f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats per case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks the script runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 1 if args.smoke else args.repeats
    host_len, host_epochs, lab_epochs = (20, 1, 1) if args.smoke else (500, 6, 2)  # host: host_overhead.py's size
    cases = [("host acc=1", host_case(host_len, host_epochs, 1)), ("host acc=4", host_case(host_len, host_epochs, 4)),
             ("lab", lab_case(8 if args.smoke else 45, lab_epochs))]
    with tempfile.TemporaryDirectory(prefix="ek-bench-doctor-") as root:
        rows = [measure(name, build, repeats, Path(root)) for name, build in cases]
    env = environment(torch.device("cpu"))
    print(f"doctor cost: attach_standard(doctor=False) vs doctor=True, {repeats} interleaved repeats, "
          f"median per run; {args.threads} torch thread(s)")
    print(describe(env))
    print()
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": env, "repeats": repeats, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
