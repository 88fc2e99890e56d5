"""The loop doctor: the classic training mistakes, found from what the run already records.

Each check is a pure function over facts the run has on the host anyway (the
model and optimizer before the first step, the first batches, the step log,
the validation history) and returns ``Finding``s: one line of evidence with
numbers and a "To fix: ...". ``handlers.Doctor`` runs them during training
at the cadence the other handlers already read values; ``diagnose_run``
runs them again from a run directory's logs.

>>> import torch
>>> from engine_kit.doctor import check_weight_decay, decay_groups
>>> model = torch.nn.Linear(4, 2)
>>> [f.code for f in check_weight_decay(model, torch.optim.AdamW(model.parameters()))]
['weight-decay-on-norms']
>>> check_weight_decay(model, torch.optim.AdamW(decay_groups(model, weight_decay=0.01)))
[]
"""

from engine_kit.doctor.data_checks import (
    BatchWaitClock,
    check_batch_device,
    check_data_wait,
    check_validation_data,
    identical_items,
    shared_samples,
    shuffle_reason,
)
from engine_kit.doctor.findings import CATALOGUE, DoctorSettings, Finding, add_new
from engine_kit.doctor.loss_inputs import LossProbe
from engine_kit.doctor.model_checks import (
    check_batchnorm_accumulation,
    check_gradients_received,
    check_parameters,
    check_train_mode,
    check_weight_decay,
    decay_groups,
    parameter_groups_with_non_finite,
)
from engine_kit.doctor.run_dir import diagnose_run, report_lines
from engine_kit.doctor.schedule_checks import check_schedule, planned_optimizer_steps
from engine_kit.doctor.step_checks import check_steps
from engine_kit.doctor.validation_checks import check_best_kept, check_overfitting

__all__ = [
    "CATALOGUE",
    "BatchWaitClock",
    "DoctorSettings",
    "Finding",
    "LossProbe",
    "add_new",
    "check_batch_device",
    "check_batchnorm_accumulation",
    "check_best_kept",
    "check_data_wait",
    "check_gradients_received",
    "check_overfitting",
    "check_parameters",
    "check_schedule",
    "check_steps",
    "check_train_mode",
    "check_validation_data",
    "check_weight_decay",
    "decay_groups",
    "diagnose_run",
    "identical_items",
    "parameter_groups_with_non_finite",
    "planned_optimizer_steps",
    "report_lines",
    "shared_samples",
    "shuffle_reason",
]
