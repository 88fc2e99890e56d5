"""Static checks of the model and the optimizer, before the first step (and which parameters got gradients)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from engine_kit.doctor.findings import Finding

NORM_LAYERS = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.LocalResponseNorm,
) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_parameters(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[Finding]:
    """An all-frozen model; trainable parameters that no param group holds.

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> [f.code for f in check_parameters(model, torch.optim.SGD(model[0].parameters(), lr=0.1))]
    ['params-not-optimized']
    """
    named = list(model.named_parameters())
    trainable = [name for name, p in named if p.requires_grad]
    if named and not trainable:
        return [Finding(
            "all-frozen",
            f"none of the model's {len(named)} parameter tensors requires grad: the loss has no gradient "
            "and nothing can train.",
            "set requires_grad=True on the layers to train (e.g. the head: model.fc.requires_grad_(True)) "
            "and build the optimizer from them.",
        )]
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    left_out = [name for name, p in named if p.requires_grad and id(p) not in owned]
    if not left_out:
        return []
    return [Finding(
        "params-not-optimized",
        f"{len(left_out)} of {len(trainable)} trainable parameter tensors are in no optimizer param group "
        f"({_names(left_out)}): they get gradients but never change.",
        "build the optimizer from model.parameters(), or freeze those on purpose with requires_grad_(False).",
    )]


def check_gradients_received(model: torch.nn.Module, received: set[int], windows: int) -> list[Finding]:
    """Trainable parameters whose ``id`` is not in ``received`` after ``windows`` optimizer steps.

    >>> model = torch.nn.Linear(2, 1)
    >>> check_gradients_received(model, {id(model.weight)}, 3)[0].evidence.split(":")[0]
    '1 of 2 trainable parameter tensors received no gradient in the first 3 optimizer steps'
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in trainable if id(p) not in received]
    if not missing:
        return []
    return [Finding(
        "no-gradient",
        f"{len(missing)} of {len(trainable)} trainable parameter tensors received no gradient in the first "
        f"{windows} optimizer steps: {_names(missing)}.",
        "use those layers in forward(), or delete them, or freeze them with requires_grad_(False) "
        "(with DDP an unused parameter also needs find_unused_parameters=True).",
    )]


def check_batchnorm_accumulation(model: torch.nn.Module, accumulation_steps: int) -> list[Finding]:
    """BatchNorm layers normalizing over each micro-batch while the optimizer steps on a window of them.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    >>> [f.code for f in check_batchnorm_accumulation(model, 4)], check_batchnorm_accumulation(model, 1)
    (['batchnorm-accumulation'], [])
    """
    if accumulation_steps <= 1:
        return []
    layers = [name or type(module).__name__ for name, module in model.named_modules()
              if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return []
    return [Finding(
        "batchnorm-accumulation",
        f"{len(layers)} BatchNorm layers ({_names(layers)}) with accumulation_steps={accumulation_steps}: "
        f"their statistics come from each micro-batch, not from the {accumulation_steps}-micro-batch window "
        "the optimizer steps on.",
        "replace them with GroupNorm or LayerNorm, use SyncBatchNorm across devices instead of accumulating, "
        "or train with accumulation_steps=1 and a larger batch.",
    )]


def no_decay_names(model: torch.nn.Module) -> list[str]:
    """Names of the biases and normalization-layer parameters of ``model`` (which should get no weight decay).

    >>> no_decay_names(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))
    ['0.bias', '1.weight', '1.bias']
    """
    names = []
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if name == "bias" or name.endswith("_bias") or isinstance(module, NORM_LAYERS):  # in_proj_bias too
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two param groups: ``weight_decay`` on weights, none on biases and normalization parameters.

    >>> groups = decay_groups(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)), 0.05)
    >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
    [(1, 0.05), (3, 0.0)]
    """
    skip = set(no_decay_names(model))
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for name, p in named if name not in skip], "weight_decay": weight_decay},
        {"params": [p for name, p in named if name in skip], "weight_decay": 0.0},
    ]


def check_weight_decay(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[Finding]:
    """Param groups that decay biases or normalization parameters.

    >>> model = torch.nn.Linear(2, 1)
    >>> [f.code for f in check_weight_decay(model, torch.optim.AdamW(model.parameters()))]
    ['weight-decay-on-norms']
    >>> check_weight_decay(model, torch.optim.AdamW(decay_groups(model, 0.01)))
    []
    """
    skip = set(no_decay_names(model))
    names = {id(p): name for name, p in model.named_parameters()}
    decayed: list[str] = []
    rates: set[float] = set()
    for group in optimizer.param_groups:
        decay = float(group.get("weight_decay", 0.0) or 0.0)
        if decay > 0:
            hit = [names[id(p)] for p in group["params"] if names.get(id(p)) in skip]
            decayed += hit
            if hit:
                rates.add(decay)
    if not decayed:
        return []
    rate = ", ".join(f"{r:g}" for r in sorted(rates))
    return [Finding(
        "weight-decay-on-norms",
        f"{type(optimizer).__name__} applies weight_decay={rate} to {len(decayed)} bias and normalization "
        f"tensors ({_names(decayed)}): decay pulls them towards 0 for no regularization benefit.",
        "use two param groups, e.g. torch.optim.AdamW(engine_kit.doctor.decay_groups(model, weight_decay="
        f"{max(rates):g}), lr=...) (weight decay on weights only).",
    )]


def modules_in_eval(model: torch.nn.Module) -> list[str]:
    """Names of the modules of ``model`` not in training mode (the root is named after its class).

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    >>> _ = model[1].eval(); modules_in_eval(model)
    ['1']
    """
    return [name or type(model).__name__ for name, module in model.named_modules() if not module.training]


def check_train_mode(model: torch.nn.Module, where: str, step: int) -> list[Finding]:
    """The model (or some of its modules) in eval mode at ``where``, during training.

    >>> model = torch.nn.Linear(2, 1)
    >>> check_train_mode(model, "the end of epoch 1", 4), [f.code for f in check_train_mode(model.eval(), "x", 4)]
    ([], ['eval-mode'])
    """
    in_eval = modules_in_eval(model)
    if not in_eval:
        return []
    total = len(list(model.modules()))
    return [Finding(
        "eval-mode",
        f"{len(in_eval)} of {total} modules ({_names(in_eval)}) were in eval mode at {where} (optimizer step "
        f"{step}): something called model.eval() during training and did not switch back, so dropout is off "
        "and BatchNorm uses frozen statistics.",
        "run evaluation through engine_kit.create_evaluator (it restores the mode), or call model.train() "
        "after your own evaluation code.",
        step,
    )]


def parameter_groups_with_non_finite(optimizer: torch.optim.Optimizer) -> list[int]:
    """Indices of the param groups holding a NaN or an infinity (one host read; call it once, at the end).

    >>> p = torch.nn.Parameter(torch.tensor([1.0, float("nan")]))
    >>> parameter_groups_with_non_finite(torch.optim.SGD([{"params": [torch.nn.Parameter(torch.ones(1))]},
    ...                                                   {"params": [p]}], lr=0.1))
    [1]
    """
    flags = []
    for group in optimizer.param_groups:
        tensors: Iterable[torch.Tensor] = [p.detach() for p in group["params"]]
        flags.append(torch.stack([torch.isfinite(t).all() for t in tensors]).all() if group["params"]
                     else torch.tensor(True))
    finite = torch.stack([f.cpu() for f in flags]).tolist()
    return [i for i, ok in enumerate(finite) if not ok]
