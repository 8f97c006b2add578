"""Record the outputs of every ``-O`` technique and the README's stacks on a few real images.

The execution-plan refactor (and any later change that must not move outputs) is tested against these
recordings by ``tests/test_references.py``. A change that alters a technique on purpose re-records its
cases in the same commit, with the technique's algorithm version bumped (``register(..., version=N)``); each
case records the versions it was made with, and the test refuses a recording whose versions are stale.

    python scripts/record_references.py            # writes tests/references/outputs{.json,-ISA.safetensors}

Quantized and bf16 kernels round differently on each CPU instruction set (AVX2's int8 products and bf16
emulation are not AVX-512's VNNI and BF16), so the outputs are recorded once per ``ISA``, torch's
``torch.backends.cpu.get_cpu_capability()``: a run records this machine's ISA and keeps the others' files
while the cases and their versions are unchanged; when they change, the others' files are stale and removed
(re-record them on such a machine).

Each case is ``(model id, data set, [-O strings])``; the images are ``IMAGES[data]`` images spread evenly
over the data set.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import vitedge
from vitedge.api import algorithm_version, config_name
from vitedge.commands import real_images
from vitedge.options import parse_options

OUT = Path(__file__).resolve().parents[1] / "tests" / "references"
IMAGES = {"mnist": 8, "cifar10": 8, "imagenet-sample": 3}

CASES: list[tuple[str, str, list[str]]] = [
    # vit4mnist on MNIST: every technique that applies to it
    ("vit4mnist", "mnist", []),
    ("vit4mnist", "mnist", ["bf16"]),
    ("vit4mnist", "mnist", ["bf16:mode=autocast"]),
    ("vit4mnist", "mnist", ["int8"]),
    ("vit4mnist", "mnist", ["int8wo"]),
    ("vit4mnist", "mnist", ["int4"]),
    ("vit4mnist", "mnist", ["mixed"]),
    ("vit4mnist", "mnist", ["sparse"]),
    ("vit4mnist", "mnist", ["structured:heads=0.25,mlp=0.25"]),
    ("vit4mnist", "mnist", ["structured:blocks=1"]),
    ("vit4mnist", "mnist", ["int8attn"]),
    ("vit4mnist", "mnist", ["int8attn:granularity=head,softmax=bf16"]),
    ("vit4mnist", "mnist", ["merge:r=1"]),
    ("vit4mnist", "mnist", ["merge:r=2,schedule=decreasing"]),
    ("vit4mnist", "mnist", ["prune:keep=0.75"]),
    ("vit4mnist", "mnist", ["adaptive"]),
    # cifar-vit on CIFAR-10: token reduction in all its settings, and the README's stacks
    ("cifar-vit", "cifar10", []),
    ("cifar-vit", "cifar10", ["merge:r=5"]),
    ("cifar-vit", "cifar10", ["merge:r=5,keep_norm=0"]),
    ("cifar-vit", "cifar10", ["merge:r=5,prop_attn=0"]),
    ("cifar-vit", "cifar10", ["merge:r=4,restore=1"]),
    ("cifar-vit", "cifar10", ["merge:schedule=seed"]),
    ("cifar-vit", "cifar10", ["prune:keep=0.7"]),
    ("cifar-vit", "cifar10", ["prune:keep=0.82,fuse=nearest,schedule=every,start=2,scorer=attn-value"]),
    ("cifar-vit", "cifar10", ["prune:keep=0.7,scorer=entropy,fuse=none"]),
    ("cifar-vit", "cifar10", ["prune:keep=0.7,scorer=norm,protect_border=1"]),
    ("cifar-vit", "cifar10", ["prune:keep=0.6,scorer=variance,schedule=every"]),
    ("cifar-vit", "cifar10", ["prune:keep=0.7,scorer=learned"]),
    ("cifar-vit", "cifar10", ["adaptive:min_keep=0.5,buckets=3,low=0.5,high=2.5"]),
    ("cifar-vit", "cifar10", ["int8attn"]),
    ("cifar-vit", "cifar10", ["merge:r=5", "int8"]),
    ("cifar-vit", "cifar10", ["merge:r=9", "bf16"]),
    ("cifar-vit", "cifar10", ["merge:r=5", "int8attn"]),
    ("cifar-vit", "cifar10", ["int8attn", "prune:keep=0.7"]),
    ("cifar-vit", "cifar10", ["structured:heads=0.5,mlp=0.5", "merge:r=4"]),
    ("cifar-vit", "cifar10", ["merge:r=4", "structured:blocks=1"]),
    ("cifar-vit", "cifar10", ["bf16:mode=autocast", "merge:r=5"]),
    # cifar-swin on CIFAR-10: window merging and window pruning (first recorded as merge/prune on Swin)
    ("cifar-swin", "cifar10", []),
    ("cifar-swin", "cifar10", ["window_merge:r=4"]),
    ("cifar-swin", "cifar10", ["window_merge:r=8"]),
    ("cifar-swin", "cifar10", ["window_merge:r=6,schedule=decreasing"]),
    ("cifar-swin", "cifar10", ["window_merge:r=8,prop_attn=0"]),
    ("cifar-swin", "cifar10", ["window_prune:keep=0.75"]),
    ("cifar-swin", "cifar10", ["window_prune:keep=0.5,scorer=norm"]),
    ("cifar-swin", "cifar10", ["window_merge:r=8", "int8"]),
    ("cifar-swin", "cifar10", ["bf16"]),
    # a timm model (random weights from the fixed seed) on ImageNet photos
    ("timm:deit_tiny_patch16_224", "imagenet-sample", []),
    ("timm:deit_tiny_patch16_224", "imagenet-sample", ["merge:r=8"]),
    ("timm:deit_tiny_patch16_224", "imagenet-sample", ["merge:r=8", "int8"]),
    ("timm:deit_tiny_patch16_224", "imagenet-sample", ["prune:keep=0.7"]),
    ("timm:deit_tiny_patch16_224", "imagenet-sample", ["int8attn"]),
]


def case_key(model_id: str, opts: list[str]) -> str:
    return f"{model_id}|{' '.join(opts) or 'baseline'}"


def images(model: vitedge.Encoder, data: str) -> torch.Tensor:
    """``IMAGES[data]`` images of ``data`` drawn evenly across the set."""
    return real_images(model, data, IMAGES[data])


def isa() -> str:
    """The CPU instruction set torch dispatches to here (``AVX2``, ``AVX512``, ...)."""
    return torch.backends.cpu.get_cpu_capability()


def recording(capability: str) -> Path:
    return OUT / f"outputs-{capability}.safetensors"


def main() -> None:
    torch.set_num_threads(2)
    outputs: dict[str, torch.Tensor] = {}
    meta: list[dict[str, object]] = []
    inputs: dict[tuple[str, str], torch.Tensor] = {}
    for model_id, data, opts in CASES:
        enc = vitedge.load(model_id)
        x = inputs.setdefault((model_id, data), images(enc, data))
        configs = parse_options(opts)
        if configs:
            vitedge.optimize_(enc, *configs)
        with torch.inference_mode():
            y = enc(x)
        key = case_key(model_id, opts)
        outputs[key] = y.contiguous()
        versions = {config_name(c): algorithm_version(c) for c in configs}
        meta.append({"key": key, "model": model_id, "data": data, "opts": opts, "versions": versions})
        print(f"{key:90s} {tuple(y.shape)}")
    OUT.mkdir(parents=True, exist_ok=True)
    index = OUT / "outputs.json"
    fresh = {"images": IMAGES, "cases": meta}
    old = json.loads(index.read_text()) if index.exists() else None
    if old is not None and {k: old[k] for k in fresh} != fresh:
        for stale in OUT.glob("outputs-*.safetensors"):
            print(f"cases changed: removing {stale.name} (re-record it on a machine with that ISA)")
            stale.unlink()
    save_file(outputs, str(recording(isa())))
    index.write_text(json.dumps(fresh, indent=1) + "\n")
    print(f"recorded {len(outputs)} cases for {isa()} in {recording(isa())}")


if __name__ == "__main__":
    main()
