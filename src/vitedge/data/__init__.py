"""Readers for the shared data and user folders: single images, datasets (MNIST IDX, CIFAR-10 tarballs,
image folders, the ImageNet sample) and video frames.

Evaluation should iterate with :func:`as_tensor_batches`: for the in-memory datasets (MNIST, CIFAR-10) it
transforms whole batches with torch ops; for folders of photos it decodes item by item.
"""

from vitedge.data.datasets import (
    DATASET_NAMES,
    ArrayDataset,
    Cifar10,
    FileDataset,
    ImageFolder,
    ImageNetSample,
    MnistTest,
    as_tensor_batches,
    open_dataset,
)
from vitedge.data.formats import read_idx, read_jpeg_tar_cached
from vitedge.data.images import (
    IMAGE_EXTENSIONS,
    ImageTransform,
    build_transform,
    decode_image_bytes,
    read_image,
    to_uint8_tensor,
)
from vitedge.data.video import VideoInfo, iter_frames, video_info

__all__ = [
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "ArrayDataset",
    "Cifar10",
    "FileDataset",
    "ImageFolder",
    "ImageNetSample",
    "ImageTransform",
    "MnistTest",
    "VideoInfo",
    "as_tensor_batches",
    "build_transform",
    "decode_image_bytes",
    "iter_frames",
    "open_dataset",
    "read_idx",
    "read_image",
    "read_jpeg_tar_cached",
    "to_uint8_tensor",
    "video_info",
]
