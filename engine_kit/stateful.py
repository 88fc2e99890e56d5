"""The registry of objects a checkpoint must capture, and vetoes on saving.

Handlers register their state here when attached; a checkpoint handler saves
every registered object and restores them on resume, so a new handler never
needs checkpoint code of its own. A save veto (NanGuard's, for instance) lets a
handler forbid saving a model it knows to be broken.
"""

from __future__ import annotations

from typing import Any, Callable

from ignite.engine import Engine

from engine_kit.errors import fix_message

SaveVeto = Callable[[Engine], "str | None"]


def register_stateful(engine: Engine, name: str, obj: Any) -> str:
    """Register ``obj`` (with ``state_dict``/``load_state_dict``) under ``name``.

    A name already used by another object gets a numeric suffix; the name
    actually used is returned (registering the same object again returns its name).

    >>> from ignite.engine import Engine
    >>> import torch
    >>> engine = Engine(lambda e, b: None)
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    >>> s1 = torch.optim.lr_scheduler.StepLR(opt, 1); s2 = torch.optim.lr_scheduler.StepLR(opt, 1)
    >>> register_stateful(engine, "scheduler", s1), register_stateful(engine, "scheduler", s2)
    ('scheduler', 'scheduler_1')
    """
    if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
        raise TypeError(
            fix_message(
                f"{type(obj).__name__} has no state_dict/load_state_dict, so it cannot be checkpointed.",
                "register an object that implements both methods.",
            )
        )
    registry = stateful_objects(engine)
    for existing_name, existing in registry.items():
        if existing is obj:
            return existing_name
    unique, n = name, 0
    while unique in registry:
        n += 1
        unique = f"{name}_{n}"
    registry[unique] = obj
    return unique


def stateful_objects(engine: Engine) -> dict[str, Any]:
    """The objects registered on ``engine``, by name (the dict itself, in registration order)."""
    if not hasattr(engine.state, "stateful"):
        engine.state.stateful = {}
    return engine.state.stateful


def add_save_veto(engine: Engine, veto: SaveVeto) -> None:
    """Add ``veto(engine) -> reason | None``; a returned reason forbids saving."""
    if not hasattr(engine.state, "save_vetoes"):
        engine.state.save_vetoes = []
    if veto not in engine.state.save_vetoes:
        engine.state.save_vetoes.append(veto)


def save_refusal(engine: Engine) -> str | None:
    """The first reason a registered veto gives against saving now, or None."""
    for veto in getattr(engine.state, "save_vetoes", []):
        reason = veto(engine)
        if reason:
            return reason
    return None
