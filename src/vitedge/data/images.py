"""Reading single images and turning them into the tensor a model expects.

One transform serves both paths: :class:`ImageTransform` is called on one image (a PIL image or a uint8
array) and its :meth:`ImageTransform.batch` on a uint8 batch ``(B, C, H, W)``; both run the same tensor ops
(channel conversion, torchvision ``resize``/``center_crop``, ``/255``, ``normalize``), so a dataset read
item by item and the same dataset read in batches give identical tensors.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFile
from torchvision.transforms import InterpolationMode

from vitedge.models.base import Preprocess

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageTransform",
    "build_transform",
    "convert_channels",
    "decode_image_bytes",
    "read_image",
    "to_uint8_tensor",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_INTERPOLATION = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}
_TRUNCATION_LOCK = threading.Lock()
# The most pixels any decode path accepts (the header is checked before decoding): 64 Mpx, below PIL's own
# DecompressionBombWarning band (from about 89 Mpx), so a bomb gets vitedge's error, never PIL's warning.
DEFAULT_MAX_PIXELS = 64 * 2**20


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make PIL raise on truncated files even if some other code set ``LOAD_TRUNCATED_IMAGES``.

    The flag is a module global in PIL, so it is forced off for the duration of one decode and restored.
    """
    with _TRUNCATION_LOCK:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _normalise_mode(img: Image.Image) -> Image.Image:
    """Return ``img`` as mode ``L`` (grey sources) or ``RGB`` (everything else)."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode.startswith("I;16"):
        # 16-bit grey: keep the top 8 bits; PIL's own convert("L") would clip at 255 instead.
        arr = np.asarray(img).astype(np.uint16) >> 8
        return Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode in ("1", "LA", "I", "F"):
        return img.convert("L")
    # P, PA, RGBA, CMYK, YCbCr, LAB, HSV: RGB drops alpha the same way torchvision's readers do.
    return img.convert("RGB")


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and fully decode one image file.

    Args:
        path: an image file in any format PIL reads (JPEG, PNG, BMP, WebP, ...).

    Returns:
        The decoded image in mode ``RGB``, or ``L`` when the file stores grey levels. EXIF orientation is not
        applied (as in torchvision and timm evaluation pipelines).

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file (the message names it).
        ValueError: the file is not an image, is corrupt or truncated, or has more than ``max_pixels``
            pixels (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    return _decode(path, str(path), max_pixels)


def decode_image_bytes(data: bytes, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode an encoded image held in memory (e.g. a tar member) to mode ``RGB`` or ``L``.

    Args:
        data: the encoded file contents.
        name: what to call the image in error messages.

    Raises:
        ValueError: the bytes are not an image, or are corrupt or truncated (the message names ``name``).
    """
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source: Path | io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive number of pixels, got {max_pixels}")
    try:
        with _strict_decoding(), Image.open(source) as img:
            w, h = img.size
            if w * h > max_pixels:  # from the header, before a byte of pixels is decoded
                raise _TooLarge(f"image {name} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
            img.load()
            return _normalise_mode(img)
    except _TooLarge as e:
        raise ValueError(f"{e} (--max-pixels)") from None
    except Image.DecompressionBombError as e:  # PIL refuses far larger headers itself, at open
        limit = f"over the limit of {max_pixels} pixels (--max-pixels)"
        raise ValueError(f"image {name} is {limit}: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ValueError(f"{name} is not an image file PIL can read") from e
    except PermissionError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on damaged data
        raise ValueError(f"image {name} is corrupt or truncated: {e}") from e


class _TooLarge(Exception):
    pass


def to_uint8_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """A PIL image or uint8 array as a uint8 tensor ``(C, H, W)`` with C of 1 or 3 (alpha dropped).

    Args:
        image: a PIL image, or a uint8 array shaped ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` (RGB order)
            or ``(H, W, 4)`` (RGBA).

    Raises:
        TypeError: ``image`` is neither a PIL image nor a numpy array.
        ValueError: the array is not uint8 or has an unsupported shape.
    """
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(_normalise_mode(image))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image or a numpy uint8 array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image array shaped (H, W) or (H, W, 1|3|4), got shape {image.shape}")
    # (H, W, C) -> (C, H, W); copy so the tensor never aliases (possibly read-only) caller memory.
    return torch.from_numpy(image[:, :, :3].transpose(2, 0, 1).copy())


def convert_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Convert uint8 images ``(..., C, H, W)`` with C in {1, 3} to ``in_chans`` channels.

    Grey to RGB repeats the channel; RGB to grey uses ITU-R 601-2 luma in the same fixed-point arithmetic as
    PIL's ``convert("L")``, so the result matches PIL exactly.
    """
    channels = x.shape[-3]
    if channels == in_chans:
        return x
    if channels == 1 and in_chans == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    if channels == 3 and in_chans == 1:
        r, g, b = x.to(torch.int32).unbind(-3)
        luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
        return luma.to(torch.uint8).unsqueeze(-3)
    raise ValueError(f"cannot convert {channels}-channel images to {in_chans} channels; supported: 1 and 3")


class ImageTransform:
    """Preprocess images for one model: channels, resize (+ centre crop), scale to [0, 1], normalise.

    A plain class rather than a closure so it pickles into DataLoader worker processes.

    Args:
        pre: the model's :class:`~vitedge.models.base.Preprocess`.
    """

    def __init__(self, pre: Preprocess) -> None:
        if pre.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3 for image data, got {pre.in_chans}")
        if any(s <= 0 for s in pre.img_size):
            raise ValueError(f"img_size must be positive, got {pre.img_size}")
        if pre.resize is not None and pre.resize <= 0:
            raise ValueError(f"resize must be a positive short-side length or None, got {pre.resize}")
        self.pre = pre
        self._interpolation = _INTERPOLATION[pre.interpolation]
        self._mean = list(pre.mean)
        self._std = list(pre.std)

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """One image (PIL or uint8 array ``(H, W[, C])``) -> float tensor ``(C, H, W)``."""
        return self.batch(to_uint8_tensor(image))

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images ``(..., C, H, W)`` (C of 1 or 3) -> normalised float32 ``(..., in_chans, *img_size)``.

        Images already of size ``img_size`` are not resized, even when ``pre.resize`` is set, so MNIST and
        CIFAR-10 pass through exactly.
        """
        if x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got dtype {x.dtype}")
        if x.ndim < 3:
            raise ValueError(f"expected images shaped (..., C, H, W), got shape {tuple(x.shape)}")
        x = self.resize(convert_channels(x, self.pre.in_chans))
        # Explicit /255 rather than to_dtype(scale=True), which multiplies by 1/255 and can differ by an ulp.
        x = x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        return TF.normalize(x, mean=self._mean, std=self._std, inplace=True)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """Resize uint8 images ``(..., C, H, W)`` to ``img_size`` as ``pre`` says (uint8 out)."""
        target = list(self.pre.img_size)
        if list(x.shape[-2:]) == target:
            return x
        if self.pre.resize is None:
            return TF.resize(x, target, interpolation=self._interpolation, antialias=True)
        x = TF.resize(x, [self.pre.resize], interpolation=self._interpolation, antialias=True)
        return TF.center_crop(x, target)

    def __repr__(self) -> str:
        return f"ImageTransform({self.pre!r})"


def build_transform(pre: Preprocess) -> ImageTransform:
    """The callable that turns one PIL image or uint8 array into the model's input tensor ``(C, H, W)``.

    Args:
        pre: how the model expects its images (size, channels, resize policy, mean/std, interpolation).

    Returns:
        An :class:`ImageTransform`; call it on one image, or use its ``batch`` method on a uint8 batch.
    """
    return ImageTransform(pre)
