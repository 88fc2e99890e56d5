"""A character-level causal transformer trained on the standard library's own source.

Shows token-weighted gradient accumulation: the training sequences have
different lengths (padded, with padded targets set to ``ignore_index=-100``),
``batch_size_fn`` counts the real target tokens of each micro-batch, and so
every optimizer step applies the gradient of the mean loss over *all real
tokens of its window* — exactly what one large batch would give. Also shows
``precision="auto"`` (bf16 on a GPU, fp32 on a CPU), a warmup + cosine
schedule stepped once per optimizer step, per-step losses collected without a
host sync per iteration, and temperature sampling from the trained model.

The text ships with Python (a fixed list of ``.py`` files next to ``os.py``),
so nothing is downloaded.

Run:
    python examples/char_lm.py                  # 300 optimizer steps, d_model 128, context 128 (~9 min on 2 CPU cores)
    python examples/char_lm.py --quick          # tiny model, 40 steps, well under 30 s on 2 CPU cores
    python examples/char_lm.py --steps 1000 --device cuda --out-json lm.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from engine_kit import create_trainer
from engine_kit.doctor import decay_groups
from handlers.schedulers import attach_scheduler, optimizer_steps_per_epoch, warmup_cosine

# A fixed set of standard-library sources (~150 KB): the same text on every run
# of a given Python installation.
CORPUS_FILES = (
    "textwrap.py",
    "string.py",
    "functools.py",
    "contextlib.py",
    "heapq.py",
    "shlex.py",
    "copy.py",
    "operator.py",
)
IGNORE_INDEX = -100  # F.cross_entropy's default: targets with this value add nothing to loss or gradient


@dataclass(frozen=True)
class Config:
    """Model and run sizes; ``quick`` shrinks everything for a smoke run."""

    steps: int
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    context: int = 128
    batch_size: int = 16
    accumulation_steps: int = 4
    lr: float = 3e-3
    warmup_steps: int = 30
    sample_chars: int = 300

    @classmethod
    def quick(cls, steps: int) -> Config:
        return cls(
            steps=steps,
            d_model=64,
            context=64,
            accumulation_steps=2,
            warmup_steps=max(1, steps // 8),
            sample_chars=120,
        )


def load_corpus() -> str:
    """Concatenate the standard-library files of ``CORPUS_FILES`` that exist here."""
    stdlib = Path(os.path.dirname(os.__file__))
    parts = [(stdlib / name).read_text(encoding="utf-8") for name in CORPUS_FILES if (stdlib / name).exists()]
    if not parts:
        raise FileNotFoundError(
            f"none of {CORPUS_FILES} exists under {stdlib}. To fix: run with a Python that ships its "
            "standard library as source files (most installations do)."
        )
    return "\n".join(parts)


class Chunks(torch.utils.data.Dataset):
    """Random windows of the text with random lengths, right-padded to ``context``.

    Item ``i`` is ``(x, y)``: ``x`` holds ``length`` characters then padding, ``y``
    the next character of each real position and ``IGNORE_INDEX`` on padding.
    Starts and lengths are drawn once from ``seed``, so the data are a fixed
    function of the seed. Under a causal mask a real position never attends
    to the padding after it, so no key-padding mask is needed.
    """

    def __init__(self, data: torch.Tensor, *, num_items: int, context: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        # Lengths span 1/8 .. 1 of the context, so micro-batches differ in token count
        # (and each holds at least one real target: an all-padding batch would make the mean NaN).
        self.lengths = torch.randint(max(2, context // 8), context + 1, (num_items,), generator=gen)
        self.starts = torch.randint(0, len(data) - context - 1, (num_items,), generator=gen)
        self.data = data
        self.context = context

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, length = int(self.starts[index]), int(self.lengths[index])
        chunk = self.data[start : start + length + 1]
        x = torch.zeros(self.context, dtype=torch.long)
        y = torch.full((self.context,), IGNORE_INDEX, dtype=torch.long)
        x[:length] = chunk[:-1]
        y[:length] = chunk[1:]
        return x, y


class CharTransformer(torch.nn.Module):
    """Token + learned position embeddings, pre-norm causal encoder layers, a linear head."""

    def __init__(self, vocab_size: int, *, d_model: int, n_layers: int, n_heads: int, context: int) -> None:
        super().__init__()
        self.context = context
        self.token = torch.nn.Embedding(vocab_size, d_model)
        self.position = torch.nn.Embedding(context, d_model)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(
                d_model, n_heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(n_layers)
        )
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        h = self.token(x) + self.position(torch.arange(length, device=x.device))
        mask = torch.nn.Transformer.generate_square_subsequent_mask(length, device=x.device)
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def token_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the real (non-padded) target tokens of the micro-batch."""
    # Logits may be bf16 under autocast; the softmax and the mean are taken in fp32.
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX)


def count_tokens(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The weight of a micro-batch in its window: its number of real target tokens.

    ``token_loss`` is already a per-token mean *within* a micro-batch. The
    default weight (sequences per micro-batch) would make a window's loss the
    mean of per-batch means, so a token in a micro-batch of short sequences
    would pull harder than one in a micro-batch of long ones, and the gradient
    would depend on how the window happened to be split. Counting tokens makes
    the step's gradient the mean over every real token of the window. It stays
    a device tensor: no host sync per micro-batch.
    """
    return (y != IGNORE_INDEX).sum()


class WindowLoss:
    """Collects the token-weighted mean loss of every optimizer step, without host syncs.

    On each micro-batch it adds ``loss * tokens`` to device tensors; when the
    window closes it stores their ratio (still a tensor) and, every
    ``log_every`` steps, prints it (the only host sync). ``values()`` reads all
    of them with one transfer. It runs on ``ITERATION_COMPLETED`` because that
    is where every micro-batch's ``StepOutput`` is ``engine.state.output``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, log_every: int) -> None:
        self.optimizer = optimizer
        self.log_every = log_every
        self._weighted: torch.Tensor | float = 0.0
        self._tokens: torch.Tensor | float = 0.0
        self._steps: list[torch.Tensor] = []

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        tokens = torch.as_tensor(out.num_samples, dtype=torch.float32, device=out.loss.device)
        self._weighted = self._weighted + out.loss.float() * tokens
        self._tokens = self._tokens + tokens
        if engine.state.window_position == 0:  # this micro-batch closed the window
            self._steps.append(self._weighted / self._tokens)
            self._weighted, self._tokens = 0.0, 0.0
            step = len(self._steps)
            if step == 1 or step % self.log_every == 0:
                lr = self.optimizer.param_groups[0]["lr"]
                print(f"step {step:4d}  loss {self._steps[-1].item():.3f}  next lr {lr:.2e}")

    def values(self) -> list[float]:
        return torch.stack(self._steps).cpu().tolist() if self._steps else []


@torch.inference_mode()
def sample(
    model: CharTransformer, prompt: str, *, chars: list[str], length: int, temperature: float, seed: int
) -> str:
    """Temperature sampling, seeded on the CPU so the text is reproducible."""
    model.eval()
    index = {c: i for i, c in enumerate(chars)}
    device = next(model.parameters()).device
    ids = [index[c] for c in prompt if c in index] or [0]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(length):
        context = torch.tensor([ids[-model.context :]], device=device)
        logits = model(context)[0, -1].float().cpu()
        probs = torch.softmax(logits / temperature, dim=-1)
        ids.append(int(torch.multinomial(probs, 1, generator=gen)))
    return "".join(chars[i] for i in ids)


def resolve_device(device: str) -> str:
    """``auto`` → the GPU when there is one; refuses ``cuda`` without one."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available here. To fix: pass --device cpu or auto.")
    return device


def run(config: Config, *, device: str, seed: int) -> dict:
    """Train for ``config.steps`` optimizer steps; return losses and a sample."""
    torch.manual_seed(seed)
    text = load_corpus()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text])
    micro_batches = config.steps * config.accumulation_steps
    dataset = Chunks(data, num_items=micro_batches * config.batch_size, context=config.context, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=False)

    model = CharTransformer(
        len(chars), d_model=config.d_model, n_layers=config.n_layers, n_heads=config.n_heads, context=config.context
    ).to(device)
    optimizer = torch.optim.AdamW(decay_groups(model, weight_decay=0.01), lr=config.lr)
    trainer = create_trainer(
        model,
        optimizer,
        token_loss,
        device=device,
        precision="auto",  # bf16 autocast on a GPU, plain fp32 on a CPU
        accumulation_steps=config.accumulation_steps,
        max_grad_norm=1.0,
        batch_size_fn=count_tokens,
    )
    # total_steps counts optimizer steps, not micro-batches: the schedule ends with the run.
    total_steps = optimizer_steps_per_epoch(len(loader), config.accumulation_steps)
    schedule = warmup_cosine(optimizer, warmup_steps=config.warmup_steps, total_steps=total_steps, min_lr=config.lr / 20)
    attach_scheduler(trainer, schedule)
    window_loss = WindowLoss(optimizer, log_every=max(1, config.steps // 10))
    window_loss.attach(trainer)

    print(f"corpus {len(text):,} chars, vocab {len(chars)}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"device {device}, precision {trainer.state.precision}")
    trainer.run(loader, max_epochs=1)

    losses = window_loss.values()
    text_sample = sample(model, "def ", chars=chars, length=config.sample_chars, temperature=0.8, seed=seed)
    return {
        "losses": losses,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "sample": text_sample,
        "optimizer_steps": trainer.state.optimizer_steps,
        "vocab_size": len(chars),
        "device": device,
        "precision": trainer.state.precision,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 40 optimizer steps (CPU smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300, or 40 with --quick)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", type=Path, default=None, help="write losses, sample and step count here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    steps = args.steps if args.steps is not None else (40 if args.quick else 300)
    if steps < 2:
        raise SystemExit(f"--steps {steps} is too few. To fix: pass --steps 2 or more (warmup needs room).")
    config = Config.quick(steps) if args.quick else Config(steps=steps, warmup_steps=min(30, steps // 10 or 1))
    result = run(config, device=resolve_device(args.device), seed=args.seed)
    print(f"first logged loss {result['first_loss']:.3f}, last {result['last_loss']:.3f} after "
          f"{result['optimizer_steps']} optimizer steps (uniform guessing: {math.log(result['vocab_size']):.3f})")
    print("sample:\n" + result["sample"])
    if args.out_json is not None:
        args.out_json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
