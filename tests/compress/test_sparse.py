"""sparse: masks, neutral identity, shapes, accuracy-preserving composition, refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from support import load_cached
from vitedge.api import optimize_
from vitedge.compress.sparse import block_mask, n_m_mask
from vitedge.options import parse_options


def test_two_four_keeps_two_of_every_four() -> None:
    w = torch.randn(8, 16)
    mask = n_m_mask(w, 2, 4)
    assert (mask.reshape(8, 4, 4).sum(-1) == 2).all()


def test_block_mask_zeroes_the_requested_share_in_whole_tiles() -> None:
    mask = block_mask(torch.randn(32, 64), 8, 0.5)
    assert mask.float().mean() == 0.5
    tiles = mask.reshape(4, 8, 8, 8).float().mean(dim=(1, 3))
    assert set(tiles.flatten().tolist()) <= {0.0, 1.0}


def test_neutral_setting_reproduces_model() -> None:
    base = load_cached("vit4mnist")
    enc = optimize_(copy.deepcopy(base), *parse_options(["sparse:n=0,m=0"]))
    x = base.example_input(2)
    with torch.inference_mode():
        assert torch.equal(enc(x), base(x))


@pytest.mark.parametrize("opt", ["sparse:n=2,m=4", "sparse:block=16,sparsity=0.5"])
@pytest.mark.parametrize("model_id", ["vit4mnist", "timm:deit_tiny_patch16_224", "hf:vit"])
def test_shapes_and_sparsity(model_id: str, opt: str) -> None:
    base = load_cached(model_id)
    sparse = optimize_(copy.deepcopy(base), *parse_options([opt]))
    for view in sparse.blocks:  # every block linear lost the share of weights the option names
        for lin in (m for m in view.module.modules() if isinstance(m, torch.nn.Linear)):
            zero = (lin.weight == 0).float().mean().item()
            assert zero >= 0.5, f"{opt}: only {zero:.2f} of {tuple(lin.weight.shape)} zeroed"
    enc = optimize_(copy.deepcopy(sparse), *parse_options(["int8"]))
    x = base.example_input(1)
    with torch.inference_mode():
        assert enc(x).shape == base(x).shape


@pytest.mark.parametrize("bad", ["sparse:n=4,m=2", "sparse:n=2,m=4,block=8", "sparse:sparsity=1.0"])
def test_bad_values_are_named(bad: str) -> None:
    with pytest.raises(ValueError, match="sparse"):
        parse_options([bad])
