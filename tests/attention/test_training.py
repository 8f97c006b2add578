"""Every attention variant that `vitedge train -O ...` accepts trains: one optimiser step on cifar-vit
gives finite gradients to the backbone (and to Linformer's projections) and changes the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitedge
from vitedge.models import load


@pytest.mark.parametrize(
    "opt", ["linear:features=16", "linear:kind=elu", "linear:kind=relu", "linformer:k=16", "window:size=4"]
)
def test_one_training_step(opt: str) -> None:
    torch.manual_seed(0)
    model = load("cifar-vit")
    vitedge.optimize_(model, opt)
    model.train()
    x = model.example_input(4)
    y = torch.tensor([0, 1, 2, 3])
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert len(grads) > len(params) // 2
    assert all(torch.isfinite(g).all() for g in grads)
    torch.optim.SGD(params, lr=1e-2).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
