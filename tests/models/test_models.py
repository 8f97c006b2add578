"""Every supported model id: shapes, identity with the native model, token layout, arch spec, bad input."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from support import load_cached
from vitedge.models import load, parse_model_id
from vitedge.models.base import Encoder


def test_forward_shapes(any_model: Encoder) -> None:
    x = any_model.example_input(2)
    with torch.no_grad():
        feats = any_model.forward_features(x)
        out = any_model(x)
    assert feats.ndim == 3 and feats.shape[0] == 2
    if any_model.info.family == "vit":
        assert feats.shape[1] == any_model.layout.num_tokens
    else:
        gh, gw = any_model.final_grid
        assert feats.shape[1] == gh * gw
    assert out.shape[0] == 2 and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_forward_is_features_then_head(any_model: Encoder) -> None:
    x = any_model.example_input(2)
    with torch.no_grad():
        assert torch.equal(any_model(x), any_model.forward_head(any_model.forward_features(x)))


def test_arch_params_match_module(any_model: Encoder) -> None:
    spec = any_model.arch()
    assert spec.params == sum(p.numel() for p in any_model.parameters())
    assert spec.img_size == any_model.img_size
    assert spec.macs > 0


def test_blocks_view(any_model: Encoder) -> None:
    blocks = any_model.blocks
    assert len(blocks) > 0
    for b in blocks:
        a = b.attn
        assert a.num_heads * a.head_dim == a.proj.in_features
        assert (a.qkv is not None) != (a.q is not None)


@pytest.mark.parametrize(
    ("name", "gmacs"),
    [
        ("vit_base_patch16_224", 17.56),
        ("deit_tiny_patch16_224", 1.254),
        ("swin_tiny_patch4_window7_224", 4.49),
    ],
)
def test_known_macs(name: str, gmacs: float) -> None:
    enc = load(f"timm:{name}")
    assert enc.arch().macs / 1e9 == pytest.approx(gmacs, abs=0.006)


@pytest.mark.parametrize(
    "name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224"]
)
def test_timm_adapter_is_identity(name: str) -> None:
    torch.manual_seed(0)
    native = timm.create_model(name).eval()
    enc = load(f"timm:{name}")
    enc.model.load_state_dict(native.state_dict())
    x = enc.example_input(2)
    with torch.no_grad():
        assert torch.equal(enc(x), native(x))


def test_token_layouts() -> None:
    assert load_cached("vit4mnist").layout.num_tokens == 17
    d = load_cached("timm:deit_tiny_distilled_patch16_224").layout
    assert (d.num_cls, d.num_dist, d.num_reg, d.grid) == (1, 1, 0, (14, 14))
    r = load_cached("timm:vit_small_patch14_reg4_dinov2").layout
    assert (r.num_cls, r.num_reg, r.grid) == (1, 4, (16, 16))
    assert load_cached("hf:siglip-vision").layout.num_prefix == 0


def test_preprocess_from_model_configs() -> None:
    assert load_cached("vit4mnist").preprocess.mean == (0.1307,)
    clip = load_cached("hf:clip-vision").preprocess
    assert clip.mean[0] == pytest.approx(0.48145466) and clip.resize == 224
    assert load_cached("timm:deit_tiny_patch16_224").preprocess.resize == 248  # crop_pct 0.9


def test_img_size_option() -> None:
    enc = load("timm:deit_tiny_patch16_224", img_size=160)
    assert enc.img_size == (160, 160) and enc.layout.grid == (10, 10)
    with torch.no_grad():
        assert enc(enc.example_input(1)).shape == (1, 1000)


def test_weights_digest_tracks_weights() -> None:
    a = load("vit4mnist")
    b = load("vit4mnist")
    assert a.weights_digest() == b.weights_digest()
    with torch.no_grad():
        b.head[0].bias[0] += 1e-3
    assert a.weights_digest() != b.weights_digest()


def test_timm_weights_roundtrip(tmp_path) -> None:
    from safetensors.torch import save_file

    src = load("timm:deit_tiny_patch16_224")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    dst = load("timm:deit_tiny_patch16_224", weights=path)
    assert dst.info.trained and dst.weights_digest() == src.weights_digest()


def test_hf_directory_roundtrip(tmp_path) -> None:
    src = load_cached("hf:clip-vision")
    src.model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"shortest_edge": 224},
                "crop_size": {"height": 224, "width": 224},
                "do_center_crop": True,
                "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3,
                "resample": 3,
            }
        )
    )
    enc = load(f"hf:{tmp_path}")
    x = enc.example_input(1)
    with torch.no_grad():
        assert torch.allclose(enc(x), src(x), atol=1e-5)
    assert enc.preprocess.mean == (0.5, 0.5, 0.5)
    pickled = tmp_path / "pickled"  # the same model as a pickled checkpoint only (pytorch_model.bin)
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "config.json").read_text())
    torch.save(src.model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \.safetensors weights"):
        load(f"hf:{pickled}")


@pytest.mark.parametrize(
    ("model_id", "kwargs", "message"),
    [
        ("nonsense", {}, "unknown model id 'nonsense'"),
        ("", {}, "non-empty"),
        ("timm:", {}, "lacks a name"),
        ("timm:not_a_model_xyz", {}, "unknown timm model"),
        ("timm:resnet18", {}, "ViT-family"),
        ("timm:vit_pwee_patch16_reg1_gap_256", {}, "ParallelScalingBlock"),
        ("hf:/no/such/dir", {}, "neither a built-in"),
        ("vit4mnist", {"img_size": 32}, "28x28"),
        ("timm:deit_tiny_patch16_224", {"img_size": -3}, "positive integer"),
        ("timm:deit_tiny_patch16_224", {"weights": "/no/such.safetensors"}, "does not exist"),
    ],
)
def test_bad_model_ids(model_id: str, kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load(model_id, **kwargs)


def test_corrupt_and_mismatched_weights(tmp_path) -> None:
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load("timm:deit_tiny_patch16_224", weights=bad)
    other = tmp_path / "other.safetensors"
    save_file({"foo": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="does not fit"):
        load("timm:deit_tiny_patch16_224", weights=other)
    with pytest.raises(ValueError, match="no pickle"):
        load(
            "timm:deit_tiny_patch16_224",
            weights=tmp_path.joinpath("x.pth").write_bytes(b"x") and tmp_path / "x.pth",
        )


@pytest.mark.parametrize(
    "model_id", ["vit4mnist", "timm:deit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224"]
)
def test_bad_images(model_id: str) -> None:
    enc = load_cached(model_id)
    h, w = enc.img_size
    with pytest.raises(ValueError, match="channels"):
        enc(torch.zeros(1, enc.preprocess.in_chans + 1, h, w))
    with pytest.raises(ValueError, match="images"):
        enc(torch.zeros(1, enc.preprocess.in_chans, h + 4, w))
    with pytest.raises(ValueError, match="shape"):
        enc(torch.zeros(enc.preprocess.in_chans, h, w))


def test_parse_model_id() -> None:
    assert parse_model_id("timm:deit_tiny_patch16_224") == ("timm", "deit_tiny_patch16_224")
    assert parse_model_id("hf:vit") == ("hf", "vit")
    assert parse_model_id("cifar-vit") == ("project", "cifar-vit")
    with pytest.raises(ValueError, match="unknown model id"):
        parse_model_id("resnet50")


@pytest.mark.parametrize("model_id", ["timm:eva02_tiny_patch14_224", "timm:vit_small_patch14_reg4_dinov2"])
def test_vitedge_block_loop_matches_timm(model_id: str) -> None:
    """vitedge owns the block loop (so techniques can replace it); untouched, it equals timm's own forward."""
    enc = load_cached(model_id)
    x = enc.example_input(2)
    with torch.no_grad():
        assert torch.equal(enc(x), enc.model(x))


@pytest.mark.parametrize("model_id", ["hf:vit", "hf:clip-vision", "hf:siglip-vision"])
def test_hf_adapter_matches_transformers(model_id: str) -> None:
    enc = load_cached(model_id)
    x = enc.example_input(2)
    with torch.no_grad():
        ref = enc.inner(pixel_values=x)
        assert torch.allclose(enc.forward_features(x), ref.last_hidden_state, atol=1e-5)
        assert torch.allclose(enc(x), ref.pooler_output, atol=1e-5)


@pytest.mark.parametrize("model_id", ["timm:deit_tiny_patch16_224", "hf:clip-vision"])
def test_random_weights_are_reproducible(model_id: str) -> None:
    """Random-weight models come from a fixed seed (same digest in every process) without touching the
    caller's RNG state."""
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load(model_id)
    assert torch.equal(torch.rand(1), before)
    assert a.weights_digest() == load_cached(model_id).weights_digest()
