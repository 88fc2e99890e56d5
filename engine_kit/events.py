"""The training-step events that engine_kit adds to ignite's ``Events``."""

from __future__ import annotations

from ignite.engine import EventEnum


class StepEvents(EventEnum):
    """Events fired by the trainer's step, in loop order.

    One ignite iteration is one micro-batch; an optimizer step closes an
    accumulation window of ``accumulation_steps`` micro-batches (fewer at the
    end of an epoch: a window never spans an epoch boundary)::

        for epoch in epochs:                       # Events.EPOCH_STARTED (model.train())
            for batch in loader:                   # Events.ITERATION_STARTED
                if the batch opens a window:
                    # >>> STEP_STARTED             (before the window's first forward: ignite's
                    #                               ParamSchedulers attach here; not fired again when
                    #                               the window retries a step GradScaler skipped)
                with autocast:                     # no-op context in fp32
                    loss = loss_fn(model(x), y)
                scaler.scale(loss * n / N).backward()   # n: samples of batch, N: of window
                # >>> BACKWARD_COMPLETED           (every micro-batch)
                if window is complete or batch is the epoch's last:
                    scaler.unscale_(optimizer)     # gradients now in true units
                    # >>> GRADIENTS_READY          (unscaled, not yet clipped)
                    grad_norm = clip_grad_norm_(params, max_grad_norm)  # pre-clip norm kept
                    scaler.step(optimizer); scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    # >>> OPTIMIZER_STEP_COMPLETED (a real step: schedulers advance here)
                    # >>> OPTIMIZER_STEP_SKIPPED   (fp16 overflow: GradScaler skipped the step)
                                                   # Events.ITERATION_COMPLETED
            # pending window flushed here for loaders without a length
                                                   # Events.EPOCH_COMPLETED (validation, checkpoints)
                    # >>> CHECKPOINT_SAVED         (fired by CheckpointRotation once a file is durable)

    A run that ends inside a window (``terminate()``, ``max_iters``, the loader
    running dry) steps the partial window before ``Events.TERMINATE`` /
    ``EPOCH_COMPLETED`` handlers run, exactly as a ragged epoch tail; an
    exception discards it (gradients zeroed, no step). Either way the next
    ``run()`` starts from a closed window with no gradients.

    Filters work as on any ignite event; the counter each event's ``every=``
    filter uses is the matching ``engine.state`` attribute
    (``STEP_STARTED`` → ``steps_started``, the 1-based number of the step
    being started, ``BACKWARD_COMPLETED`` → ``iteration``, ``GRADIENTS_READY`` → ``windows``,
    ``OPTIMIZER_STEP_COMPLETED`` → ``optimizer_steps``,
    ``OPTIMIZER_STEP_SKIPPED`` → ``skipped_steps``,
    ``CHECKPOINT_SAVED`` → ``checkpoints_saved``).

    >>> StepEvents.OPTIMIZER_STEP_COMPLETED.value
    'optimizer_step_completed'
    """

    STEP_STARTED = "step_started"
    BACKWARD_COMPLETED = "backward_completed"
    GRADIENTS_READY = "gradients_ready"
    OPTIMIZER_STEP_COMPLETED = "optimizer_step_completed"
    OPTIMIZER_STEP_SKIPPED = "optimizer_step_skipped"
    CHECKPOINT_SAVED = "checkpoint_saved"


# Which engine.state counter each event's `every=`/`once=` filter reads.
EVENT_COUNTERS: dict[StepEvents, str] = {
    StepEvents.STEP_STARTED: "steps_started",
    StepEvents.BACKWARD_COMPLETED: "iteration",
    StepEvents.GRADIENTS_READY: "windows",
    StepEvents.OPTIMIZER_STEP_COMPLETED: "optimizer_steps",
    StepEvents.OPTIMIZER_STEP_SKIPPED: "skipped_steps",
    StepEvents.CHECKPOINT_SAVED: "checkpoints_saved",
}
