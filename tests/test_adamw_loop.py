"""The continual benchmarks' shared AdamW loop (:func:`ortho_adapters.jobs.adamw_loop.train_adamw`)."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from ortho_adapters.jobs.adamw_loop import train_adamw


def record_chunks(
    seed: int, n: int = 10, batch_size: int = 4, epochs: int = 2
) -> tuple[list[list[int]], list]:
    weight = nn.Parameter(torch.zeros(3))
    model = nn.Module()
    model.w = weight
    seen: list[list[int]] = []

    def chunk_loss(chunk: list[int]) -> torch.Tensor:
        seen.append(list(chunk))
        return (weight - 1.0).pow(2).sum() * len(chunk)

    losses = train_adamw(model, list(range(n)), chunk_loss, lr=0.1, epochs=epochs, batch_size=batch_size,
                         seed=seed, disable_progress=True)  # fmt: skip
    return seen, losses


def test_every_epoch_visits_each_example_once_in_a_seeded_shuffle():
    seen, losses = record_chunks(seed=3)
    assert [len(c) for c in seen] == [4, 4, 2, 4, 4, 2] and len(losses) == 6
    epochs = [sum(seen[:3], []), sum(seen[3:], [])]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    # reference: the same permutations drawn independently with random.Random(seed)
    rng, want = random.Random(3), []
    for _ in range(2):
        order = list(range(10))
        rng.shuffle(order)
        want.append(order)
    assert epochs == want
    assert record_chunks(seed=3)[0] == seen and record_chunks(seed=4)[0] != seen


def test_the_penalty_trains_but_is_not_in_the_returned_losses():
    weight = nn.Parameter(torch.zeros(2))
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    model = nn.Module()
    model.w, model.f = weight, frozen
    model.train()
    zero = lambda chunk: weight.sum() * 0.0  # noqa: E731
    losses = train_adamw(model, list(range(8)), zero, lr=0.01, epochs=1, batch_size=2, seed=0,
                         penalty=lambda m: m.w.sum(), disable_progress=True)  # fmt: skip
    assert losses == [0.0] * 4
    # Adam's first steps move each entry by about lr against the sign of its gradient (+1 here)
    torch.testing.assert_close(weight.detach(), torch.full((2,), -0.04), atol=1e-4, rtol=0)
    assert torch.equal(frozen, torch.ones(2)) and not model.training


def test_the_loss_goes_down_on_a_least_squares_problem():
    _, losses = record_chunks(seed=0, epochs=5)
    assert losses[-1] < 0.2 * losses[0] and losses[0] == pytest.approx(12.0)
