"""Batched augmentation: deterministic under a fixed generator, shape- and dtype-preserving, exact."""

from __future__ import annotations

import torch

from vitedge.train.augment import (
    PAD,
    TRIVIAL_OPS,
    augment_batch,
    crop_flip,
    cutout,
    mix,
    plan_epoch,
    to_unit,
    trivial_augment,
)


def _images(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8), torch.arange(n) % 10


def _plan(seed: int, n: int = 16, steps: int = 2):
    return plan_epoch(
        n,
        steps,
        img_size=(32, 32),
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        generator=torch.Generator().manual_seed(seed),
    )


def test_plan_is_a_function_of_the_seed() -> None:
    a, b, c = _plan(3), _plan(3), _plan(4)
    for name in a.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.order, c.order)
    assert sorted(a.order.tolist()) == list(range(16))
    assert set(a.mix_kind.tolist()) <= {1, 2}
    assert ((a.mix_lam >= 0) & (a.mix_lam <= 1)).all()


def test_augment_batch_deterministic_shapes_dtypes() -> None:
    images, labels = _images()
    fill = torch.tensor([0.5, 0.5, 0.5])
    for policy in ("none", "basic", "cutout", "trivial"):
        outs = [
            augment_batch(images, labels, _plan(7), 1, batch_size=8, policy=policy, fill=fill, mixing=True)
            for _ in range(2)
        ]
        assert torch.equal(outs[0].x, outs[1].x)
        b = outs[0]
        assert b.x.shape == (8, 3, 32, 32) and b.x.dtype == torch.float32
        assert b.y.shape == (8,) and b.y.dtype == torch.int64
        assert b.y_mix is not None and torch.equal(b.y_mix, b.y.flip(0))
        assert float(b.x.min()) >= 0.0 and float(b.x.max()) <= 1.0
    plain = augment_batch(images, labels, _plan(7), 0, batch_size=8, policy="none", fill=fill, mixing=False)
    assert torch.equal(plain.x, to_unit(images[_plan(7).order[:8]])) and plain.lam is None


def test_neutral_settings_are_identities() -> None:
    x = to_unit(_images(4)[0])
    centred = torch.full((4, 2), PAD)
    assert torch.equal(crop_flip(x, centred, torch.zeros(4, dtype=torch.bool)), x)
    assert torch.equal(crop_flip(x, centred, torch.ones(4, dtype=torch.bool)), x.flip(3))
    identity = torch.full((4,), TRIVIAL_OPS.index("identity"))
    assert torch.equal(trivial_augment(x, identity, torch.rand(4)), x)
    none = torch.tensor(0)
    assert torch.equal(mix(x, none, torch.tensor(0.3), torch.tensor([0, 32, 0, 32])), x)


def test_each_trivial_op_keeps_shape_and_range() -> None:
    x = to_unit(_images(len(TRIVIAL_OPS))[0]) * 0.5 + 0.25  # not full range, so autocontrast acts
    ops = torch.arange(len(TRIVIAL_OPS))
    out = trivial_augment(x, ops, torch.full((len(TRIVIAL_OPS),), 0.8))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    changed = [(out[i] - x[i]).abs().max().item() > 0 for i in range(len(TRIVIAL_OPS))]
    assert changed == [name != "identity" for name in TRIVIAL_OPS]


def test_crop_shifts_and_cutout_fills() -> None:
    x = to_unit(_images(2)[0])
    shifted = crop_flip(x, torch.tensor([[PAD + 1, PAD], [PAD, PAD + 2]]), torch.zeros(2, dtype=torch.bool))
    assert torch.equal(shifted[0, :, :-1], x[0, :, 1:])
    assert torch.equal(shifted[1, :, :, :-2], x[1, :, :, 2:])
    fill = torch.tensor([0.1, 0.2, 0.3])
    cut = cutout(x, torch.tensor([[16, 16], [0, 0]]), fill, size=8)
    assert torch.equal(cut[0, :, 12:20, 12:20], fill[:, None, None].expand(3, 8, 8))
    assert torch.equal(cut[0, :, :12], x[0, :, :12])
    assert int((cut[1] != x[1]).any(0).sum()) <= 16  # clipped at the corner: at most 4x4 pixels


def test_cutmix_pastes_the_partner() -> None:
    x = to_unit(_images(4)[0])
    out = mix(x, torch.tensor(2), torch.tensor(0.75), torch.tensor([0, 16, 0, 16]))
    assert torch.equal(out[0, :, :16, :16], x[3, :, :16, :16])
    assert torch.equal(out[0, :, 16:], x[0, :, 16:])
    mixed = mix(x, torch.tensor(1), torch.tensor(0.25), torch.tensor([0, 0, 0, 0]))
    torch.testing.assert_close(mixed, 0.25 * x + 0.75 * x.flip(0))
