"""read_image and the image transform, on real photos from the shared data."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vitedge.data.images import (
    ImageTransform,
    build_transform,
    convert_channels,
    decode_image_bytes,
    read_image,
    to_uint8_tensor,
)
from vitedge.models.base import Preprocess
from vitedge.paths import data_root

MNIST_PRE = Preprocess(img_size=(28, 28), in_chans=1, mean=(0.1307,), std=(0.3081,))
CIFAR_PRE = Preprocess(img_size=(32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))


@pytest.fixture(scope="module")
def photo_path() -> Path:
    return data_root() / "imagenet-sample" / "n01440764_tench.jpg"


# --- read_image ---------------------------------------------------------------------------------


def test_read_image_decodes_a_real_jpeg(photo_path: Path) -> None:
    img = read_image(photo_path)
    assert img.mode == "RGB"
    assert min(img.size) == 256  # the sample is stored with the short side at 256 px
    assert np.asarray(img).std() > 10  # actually decoded, not a blank canvas


def test_read_image_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match=r"nope\.jpg does not exist"):
        read_image(missing)


def test_read_image_rejects_non_image_bytes(tmp_path: Path) -> None:
    fake = tmp_path / "notes.jpg"
    fake.write_bytes(b"these are not the pixels you are looking for\n" * 20)
    with pytest.raises(ValueError, match=r"notes\.jpg is not an image"):
        read_image(fake)


def test_read_image_rejects_truncated_jpeg(tmp_path: Path, photo_path: Path) -> None:
    data = photo_path.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: int(len(data) * 0.4)])
    with pytest.raises(ValueError, match=r"cut\.jpg is corrupt or truncated"):
        read_image(cut)


def test_read_image_strict_even_if_pil_flag_was_set(
    tmp_path: Path, photo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = photo_path.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: int(len(data) * 0.4)])
    with pytest.raises(ValueError, match="truncated"):
        read_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def test_read_image_rejects_truncated_png(tmp_path: Path, photo_path: Path) -> None:
    png = tmp_path / "full.png"
    Image.open(photo_path).save(png)
    cut = tmp_path / "cut.png"
    data = png.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.4)])
    assert read_image(png).size == Image.open(photo_path).size
    with pytest.raises(ValueError, match=r"cut\.png is corrupt or truncated"):
        read_image(cut)


def test_read_image_modes(tmp_path: Path, photo_path: Path) -> None:
    rgb = Image.open(photo_path).convert("RGB")
    rgb.convert("L").save(tmp_path / "grey.png")
    rgb.convert("RGBA").save(tmp_path / "alpha.png")
    rgb.convert("P").save(tmp_path / "palette.png")
    deep = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit grey
    assert read_image(tmp_path / "grey.png").mode == "L"
    assert read_image(tmp_path / "alpha.png").mode == "RGB"
    assert read_image(tmp_path / "palette.png").mode == "RGB"
    deep_read = read_image(tmp_path / "deep.png")
    assert deep_read.mode == "L"
    np.testing.assert_array_equal(np.asarray(deep_read), (deep >> 8).astype(np.uint8))


def test_decode_image_bytes_names_the_source() -> None:
    with pytest.raises(ValueError, match="member-7"):
        decode_image_bytes(b"\x00" * 100, name="member-7")


# --- transform ------------------------------------------------------------------------------------


def test_passthrough_is_exact_for_mnist_sized_digits() -> None:
    digit = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    expected = (torch.from_numpy(digit).float() / 255 - 0.1307) / 0.3081
    out = build_transform(MNIST_PRE)(digit)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    assert torch.equal(out[0], expected)


def test_passthrough_is_exact_for_cifar_sized_rgb() -> None:
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mean = torch.tensor(CIFAR_PRE.mean).view(3, 1, 1)
    std = torch.tensor(CIFAR_PRE.std).view(3, 1, 1)
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.equal(build_transform(CIFAR_PRE)(image), expected)
    # A PIL image of the same pixels gives the same tensor.
    assert torch.equal(build_transform(CIFAR_PRE)(Image.fromarray(image)), expected)


def test_no_resize_when_size_matches_even_with_resize_policy() -> None:
    pre = Preprocess(img_size=(32, 32), resize=36, mean=(0.0,) * 3, std=(1.0,) * 3)
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = build_transform(pre)(image)
    assert torch.equal(out, torch.from_numpy(image).permute(2, 0, 1).float() / 255)


def test_resize_and_centre_crop(photo_path: Path) -> None:
    pre = Preprocess(img_size=(224, 224), resize=256)
    out = build_transform(pre)(read_image(photo_path))
    assert out.shape == (3, 224, 224)
    assert torch.isfinite(out).all()


def test_centre_crop_keeps_the_centre() -> None:
    # 100x200 image: black left and right quarters, white middle half. Short side 100 -> 50 gives 50x100;
    # the centre 50x50 crop is exactly the white middle.
    image = np.zeros((100, 200), dtype=np.uint8)
    image[:, 50:150] = 255
    pre = Preprocess(
        img_size=(50, 50), in_chans=1, mean=(0.0,), std=(1.0,), resize=50, interpolation="nearest"
    )
    out = build_transform(pre)(image)
    assert out.shape == (1, 50, 50)
    assert torch.equal(out, torch.ones(1, 50, 50))


def test_straight_resize_to_non_square(photo_path: Path) -> None:
    pre = Preprocess(img_size=(96, 128), interpolation="bilinear")
    assert build_transform(pre)(read_image(photo_path)).shape == (3, 96, 128)


def test_grey_to_three_channels() -> None:
    grey = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 30), dtype=np.uint8), mode="L")
    out = build_transform(Preprocess(img_size=(40, 30), mean=(0.0,) * 3, std=(1.0,) * 3))(grey)
    assert out.shape == (3, 40, 30)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_rgb_to_one_channel_matches_pil(photo_path: Path) -> None:
    rgb = read_image(photo_path)
    grey = convert_channels(to_uint8_tensor(rgb), 1)
    assert grey.shape == (1, rgb.size[1], rgb.size[0])
    np.testing.assert_array_equal(grey[0].numpy(), np.asarray(rgb.convert("L")))
    out = build_transform(MNIST_PRE)(rgb)
    assert out.shape == (1, 28, 28)


@pytest.mark.parametrize("shape", [(20, 24), (20, 24, 1), (20, 24, 3), (20, 24, 4)])
def test_array_shapes_accepted(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
    assert build_transform(CIFAR_PRE)(image).shape == (3, 32, 32)


def test_bad_arrays_are_rejected() -> None:
    transform = build_transform(CIFAR_PRE)
    with pytest.raises(ValueError, match="float32"):
        transform(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(32, 32, 2\)"):
        transform(np.zeros((32, 32, 2), dtype=np.uint8))
    with pytest.raises(TypeError, match="list"):
        transform([[0, 1]])  # type: ignore[arg-type]


def test_batch_equals_item_by_item(photo_path: Path) -> None:
    transform = build_transform(Preprocess(img_size=(64, 64), resize=72))
    crops = [np.asarray(read_image(photo_path))[i * 10 : i * 10 + 100, :120] for i in range(3)]
    batch = torch.stack([to_uint8_tensor(c) for c in crops])  # (3, 3, 100, 120)
    assert torch.equal(transform.batch(batch), torch.stack([transform(c) for c in crops]))


def test_transform_validates_preprocess_and_pickles() -> None:
    with pytest.raises(ValueError, match="in_chans must be 1 or 3"):
        ImageTransform(Preprocess(img_size=(8, 8), in_chans=4, mean=(0.5,) * 4, std=(0.5,) * 4))
    transform = build_transform(MNIST_PRE)
    clone = pickle.loads(pickle.dumps(transform))  # in memory only: DataLoader workers need this
    digit = np.full((28, 28), 77, dtype=np.uint8)
    assert torch.equal(clone(digit), transform(digit))
