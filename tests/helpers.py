"""Small shared fixtures: tiny models, seeded data, a do-nothing engine."""

from __future__ import annotations

import torch
from ignite.engine import Engine


def linear_model(seed: int = 0) -> torch.nn.Linear:
    """An nn.Linear(2, 1) with seeded weights."""
    torch.manual_seed(seed)
    return torch.nn.Linear(2, 1)


def mlp(seed: int = 0, in_features: int = 4, hidden: int = 8, out: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(in_features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, out))


def regression_batches(n_samples: int = 16, batch_size: int = 4, seed: int = 1, features: int = 2) -> list:
    """A seeded list of (x, y) batches; the last one is short when sizes do not divide."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, features, generator=gen)
    y = torch.randn(n_samples, 1, generator=gen)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n_samples, batch_size)]


def classification_batches(n_batches: int, batch_size: int, seed: int = 1, features: int = 4, classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, features, generator=gen), torch.randint(0, classes, (batch_size,), generator=gen))
        for _ in range(n_batches)
    ]


def noop_engine() -> Engine:
    """An engine whose step does nothing: for handler tests that need no model."""
    return Engine(lambda engine, batch: None)


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def assert_same(a, b) -> None:
    """Assert two nested structures (dicts, lists, tensors, plain values) are exactly equal."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b
