#!/usr/bin/env bash
# Train the three reference CIFAR-10 models on one GPU within about 7.5 minutes of wall clock:
#   1. cifar-resnet (ResNet-9 teacher, SGD, 1.5 min budget including decoding the tarballs),
#   2. cifar-vit (DeiT hard distillation from the teacher) and cifar-swin (soft KD) as two concurrent
#      processes on the same GPU, each with a 5.7 min budget (epochs are refitted to the budget after every
#      epoch, and the cosine schedule follows).
# TEACHER_MINUTES and STUDENT_MINUTES change the budgets.
#
# Writes into $OUT (7 files, each under 16 MB): cifar-{resnet,vit,swin}.{safetensors,json} and train.log.
# Commit the six model files to src/vitedge/models/weights/.
#
# Needs: python3 with torch (CUDA), timm, safetensors, numpy, rich, pillow; vitedge runs from src/ (not
# installed). CIFAR-10 tarballs in $VITEDGE_DATA/cifar10/{train,test}.tar.gz (default .devdata/).
#
# SMOKE=1 runs the same commands with tiny settings (a few hundred images, 2 epochs) to check the script on a
# CPU machine:  SMOKE=1 PYTHON=.venv/bin/python VITEDGE_DATA=../shared/data scripts/train_reference_models.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export VITEDGE_DATA="${VITEDGE_DATA:-$ROOT/.devdata}"
export VITEDGE_CACHE="${VITEDGE_CACHE:-/tmp/vitedge-cache}"
SMOKE="${SMOKE:-0}"
if [[ "$SMOKE" == 1 ]]; then
  OUT="${OUT:-/tmp/vitedge-smoke-out}"
else
  OUT="${OUT:?set OUT to the folder for the weights, model cards and log}"
fi
PY="${PYTHON:-python3}"
RUNS="${RUNS:-/tmp/vitedge-runs}"
TEACHER_MINUTES="${TEACHER_MINUTES:-1.5}"
STUDENT_MINUTES="${STUDENT_MINUTES:-5.7}"
THREADS="${THREADS:-$([[ "$SMOKE" == 1 ]] && echo 1 || echo 4)}"

mkdir -p "$OUT" "$VITEDGE_CACHE"
rm -rf "$RUNS"
mkdir -p "$RUNS"
# --install copies each finished model straight into $OUT; the students load the teacher from there.
export VITEDGE_WEIGHTS="$OUT"
LOG="$OUT/train.log"
: >"$LOG"

# Tiny settings for SMOKE=1; given after the real options, they win (argparse keeps the last value).
SMOKE_OPTS=()
if [[ "$SMOKE" == 1 ]]; then
  SMOKE_OPTS=(--limit 256 --eval-limit 200 --epochs 2 --batch 64 --eval-batch 200 --max-minutes 3)
fi

say() { echo "[script $(date +%T)] $*" | tee -a "$LOG"; }

# run NAME CMD...: run CMD with its output prefixed by [NAME], to the terminal and the log.
run() {
  local name=$1
  shift
  set +e
  "$@" 2>&1 | sed -u "s/^/[$name] /" | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  set -e
  say "$name exited with status $status"
  return "$status"
}

# train MINUTES MODEL OPTIONS...: one training process with a MINUTES budget; a hard timeout 2 minutes later
# is only a guard against a hang (the budget ends the run long before).
train() {
  local minutes=$1
  shift
  timeout "$(awk "BEGIN { print int($minutes * 60 + 120) }")" \
    "$PY" -m vitedge.train "$@" --max-minutes "$minutes" --data cifar10 --threads "$THREADS" --install --json \
    ${SMOKE_OPTS[@]+"${SMOKE_OPTS[@]}"}
}

say "start: SMOKE=$SMOKE OUT=$OUT VITEDGE_DATA=$VITEDGE_DATA"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, torch, timm, numpy, PIL
import vitedge.train  # fails here, before any training, if a dependency is missing
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()} torch {torch.__version__} timm {timm.__version__} "
      f"numpy {numpy.__version__} pillow {PIL.__version__} "
      f"cuda {cuda} {torch.cuda.get_device_name(0) if cuda else 'cpu'}")
EOF

# 1. The teacher. Its first run also decodes the tarballs into $VITEDGE_CACHE for the students.
say "teacher: cifar-resnet, budget ${TEACHER_MINUTES} min"
teacher_ok=1
run resnet train "$TEACHER_MINUTES" cifar-resnet --out "$RUNS/cifar-resnet" \
  --epochs 24 --batch 512 --optimizer sgd --lr 0.4 --momentum 0.9 --weight-decay 5e-4 \
  --warmup-epochs 5 --label-smoothing 0.2 --augment cutout --seed 0 || teacher_ok=0

# 2. The two students at once; without a teacher (it failed) they train on the labels alone.
vit_teacher=() swin_teacher=()
if [[ $teacher_ok == 1 && -f "$OUT/cifar-resnet.safetensors" ]]; then
  vit_teacher=(--teacher cifar-resnet --hard-distill)
  swin_teacher=(--teacher cifar-resnet --ce-weight 0.5 --kd-weight 0.5 --temperature 4)
else
  say "WARNING: no teacher weights; training the students without distillation"
fi
say "students: cifar-vit and cifar-swin concurrently, budget ${STUDENT_MINUTES} min each"
run vit train "$STUDENT_MINUTES" cifar-vit --out "$RUNS/cifar-vit" \
  --epochs 300 --batch 512 --optimizer adamw --lr 1e-3 --weight-decay 0.05 --warmup-epochs 5 \
  --label-smoothing 0.1 --augment trivial --seed 0 ${vit_teacher[@]+"${vit_teacher[@]}"} &
vit_pid=$!
run swin train "$STUDENT_MINUTES" cifar-swin --out "$RUNS/cifar-swin" \
  --epochs 300 --batch 512 --optimizer adamw --lr 1e-3 --weight-decay 0.05 --warmup-epochs 5 \
  --label-smoothing 0.1 --augment trivial --seed 0 ${swin_teacher[@]+"${swin_teacher[@]}"} &
swin_pid=$!
status=0
wait "$vit_pid" || status=1
wait "$swin_pid" || status=1
[[ $teacher_ok == 1 ]] || status=1

say "results in $OUT:"
ls -l "$OUT" | tee -a "$LOG"
for m in cifar-resnet cifar-vit cifar-swin; do
  if [[ -f "$OUT/$m.json" ]]; then
    "$PY" - "$OUT/$m.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
card = json.load(open(sys.argv[1]))
acc, tr = card["accuracy"], card["training"]
print(f"{card['model']}: top1 {acc['top1']:.4f} top5 {acc['top5']:.4f} (n={acc['n']}), "
      f"{tr['epochs_run']}/{tr['epochs_requested']} epochs in {tr['seconds']:.0f} s on {tr['device']}")
EOF
  else
    say "MISSING: $m"
    status=1
  fi
  # Files of 16 MB or more do not come back from the device machine: split them (reassemble with
  # cat $m.safetensors.part-* > $m.safetensors; the card's sha256 checks the result).
  if [[ -f "$OUT/$m.safetensors" && $(stat -c %s "$OUT/$m.safetensors") -ge 16000000 ]]; then
    sha256sum "$OUT/$m.safetensors" | tee -a "$LOG"
    split -b 8000000 "$OUT/$m.safetensors" "$OUT/$m.safetensors.part-" && rm "$OUT/$m.safetensors"
    say "split $m.safetensors into parts of 8 MB"
  fi
done
say "done (status $status)"
exit "$status"
