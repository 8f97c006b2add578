"""Training and distillation (``vitedge train MODEL``).

``train(TrainConfig(model="cifar-vit", distill=DistillConfig(teacher="cifar-resnet", ...)))`` trains on the
CIFAR-10 tarballs or an ImageFolder with images decoded once and held on the device, batched on-device
augmentation, warm-up + cosine schedule, bf16 autocast, per-epoch evaluation, safetensors/JSON checkpoints
that resume exactly, and an optional time budget.
"""

from vitedge.train.config import DistillConfig, TrainConfig
from vitedge.train.events import TrainProgress, TrainResult
from vitedge.train.loop import train

__all__ = ["DistillConfig", "TrainConfig", "TrainProgress", "TrainResult", "train"]
