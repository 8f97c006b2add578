#!/usr/bin/env bash
# The fine-tunes behind the figures in docs/tokens.md, docs/compression.md and docs/training.md, one per name.
#
#   bash scripts/finetunes.sh NAME [OUT_DIR]      # e.g. bash scripts/finetunes.sh merge6-cpu runs/merge6
#   bash scripts/finetunes.sh --list
#
# Each runs `python -m vitedge.train` with the exact options the result was recorded with (the model
# directories' vitedge.json and the session notes hold the same commands). The GPU recipes need a CUDA
# device (--device cuda) and ran five at a time on one H100 with --max-minutes 5.3; on the 2-core CPU they
# take hours. Evaluate a result with `vitedge eval OUT_DIR/model --data cifar10`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=src/vitedge/models/weights
SOFT_VIT="--teacher cifar-vit --kd-weight 1 --ce-weight 1 --temperature 2 --lr 1e-4"
SOFT_SWIN="--teacher cifar-swin --kd-weight 1 --ce-weight 1 --temperature 2 --lr 2e-4"
HARD="--teacher cifar-resnet --hard-distill --ce-weight 0.5 --hard-weight 0.5 --label-smoothing 0.1 --lr 1e-4"
SOFT_VIT_CPU="--teacher cifar-vit --kd-weight 1 --ce-weight 1 --temperature 2 --batch 128 --lr 1e-4 --warmup-epochs 0.1 --augment trivial --epochs 2 --max-minutes 22 --bf16 --seed 1 --eval-limit 2000"
GPU="--batch 256 --epochs 40 --max-minutes 5.3 --bf16 --device cuda --augment trivial"

declare -A RECIPES=(
  # artifacts/cifar-vit-merge6-tuned: 3 CPU epochs under merge:r=6, distilled from the unmerged model
  [merge6-cpu]="cifar-vit --init $W/cifar-vit.safetensors -O merge:r=6 --teacher cifar-vit --kd-weight 1 --ce-weight 1 --temperature 2 --batch 128 --lr 6e-5 --warmup-epochs 0.1 --augment trivial --epochs 3 --bf16 --seed 6"
  # artifacts/cifar-vit-h50m50-recovered, its last step: 12 epochs from the averaged model it was saved from
  [h50m50-last-step]="cifar-vit --init artifacts/cifar-vit-h50m50-recovered --teacher cifar-vit --kd-weight 1 --ce-weight 1 --temperature 2 --batch 128 --lr 1e-4 --warmup-epochs 0.3 --augment trivial --epochs 12 --bf16 --seed 3 --eval-limit 2000"
  # the GPU table in docs/tokens.md (cifar-vit, about 21 epochs in 5.3 minutes)
  [vit-merge9-soft]="cifar-vit --init $W/cifar-vit.safetensors -O merge:r=9 $SOFT_VIT $GPU"
  [vit-merge9-hard]="cifar-vit --init $W/cifar-vit.safetensors -O merge:r=9 $HARD $GPU"
  [vit-prune65-soft]="cifar-vit --init $W/cifar-vit.safetensors -O prune:keep=0.65,fuse=nearest,schedule=every,start=1,scorer=attn-value $SOFT_VIT $GPU"
  [vit-prune65-hard]="cifar-vit --init $W/cifar-vit.safetensors -O prune:keep=0.65,fuse=nearest,schedule=every,start=1,scorer=attn-value $HARD $GPU"
  [vit-control-hard]="cifar-vit --init $W/cifar-vit.safetensors $HARD $GPU"
  # docs/attention.md: cifar-vit with its attention replaced, distilled from the unmodified model (CPU)
  [vit-performer-cpu]="cifar-vit --init $W/cifar-vit.safetensors -O linear:features=64 $SOFT_VIT_CPU"
  [vit-elu-cpu]="cifar-vit --init $W/cifar-vit.safetensors -O linear:kind=elu $SOFT_VIT_CPU"
  [vit-linformer-cpu]="cifar-vit --init $W/cifar-vit.safetensors -O linformer:k=16 $SOFT_VIT_CPU"
  # the cifar-swin fine-tunes in docs/tokens.md (12 epochs; then named merge:r=N, now window_merge)
  [swin-merge8-soft]="cifar-swin --init $W/cifar-swin.safetensors -O window_merge:r=8 $SOFT_SWIN --batch 256 --epochs 40 --max-minutes 5.3 --bf16 --device cuda"
  [swin-merge10-soft]="cifar-swin --init $W/cifar-swin.safetensors -O window_merge:r=10 $SOFT_SWIN --batch 256 --epochs 40 --max-minutes 5.3 --bf16 --device cuda"
)

if [[ ${1:-} == "--list" || $# -lt 1 ]]; then
  printf '%s\n' "${!RECIPES[@]}" | sort
  exit 0
fi
name=$1
out=${2:-runs/$name}
if [[ -z ${RECIPES[$name]+x} ]]; then
  echo "unknown recipe $name; one of: $(printf '%s ' "${!RECIPES[@]}")" >&2
  exit 2
fi
# shellcheck disable=SC2086  # the recipe is a list of words
exec "$PY" -m vitedge.train ${RECIPES[$name]} --out "$out"
