#!/usr/bin/env bash
# One GPU session for issues #16 and #19 (one H200, about 9 minutes; results and figures only, never data or
# weights of the 64x64 ladder, go to $OUT):
#   A. CelebA 64x64: the nested-paper NestedUNet (widths 16..96, one set of weights) trained jointly for as many
#      steps as fit TRAIN64 seconds (a probe times a training step first), then EM vs ML-EM (DDPM; widths 16, 32,
#      96; inverse cost, theory, adaptive; independent, comonotone and stratified coins) -> $OUT/celeba64-nested
#   B. CelebA 16x16: a nested ladder with a wider cost range (widths 2, 4, 8, 16, 32: 61x, against nested-cpu's
#      25x) trained with benchmarks/celeba16_cpu.sh step 12's command, then step 12's experiment on widths 2, 8,
#      32 -> $OUT/celeba16-nested-wide-3
#   C. CelebA 16x16: nested-cpu retrained with step 12's command on the GPU, then step 12's 3-width experiment
#      (widths 3, 10, 24) with the adaptive strategy (mlsde.Adaptive) beside learned p -> $OUT/celeba16-nested-cpu-3
# Measured on an H200 (2026-12-04, benchmarks/results/gpu-nested/README.md): a joint step of nested-paper at 64x64
# (batch 256, bf16) takes 0.84 s, so a 15-minute device session trains only ~175 steps -- give TRAIN64 hours, not
# minutes; the 16x16 stages ran at 0.16 s a step beside it (launch bound) and did not finish 4000 steps in 430 s.
# B and C run beside A on the same GPU (their small networks leave it mostly idle). A smoke stage runs first
# (a tiny nested training and experiment on the device, every strategy and coin scheme) and stops the script if
# it fails, so a broken device path costs a minute, not the session.
#
#   bash benchmarks/gpu_nested.sh                                  # on an H200 (the command of the results)
#   DEVICE=cpu SMOKE_ONLY=1 bash benchmarks/gpu_nested.sh          # the smoke stage on a CPU (~2 min)
#
# Settings (environment): CELEBA (a CelebA folder; default: unpack CELEBA_TAR, ../shared/data/celeba-10k.tar),
# OUT (default benchmarks/results/gpu-nested), WORK (checkpoints; default a temporary folder), DEVICE (cuda),
# TRAIN64 (seconds of 64x64 training, default 170), DEADLINE (seconds after which every stage is stopped, default
# 500), PYTHON.
# Everything is packed into $OUT/results.tar.gz (reports, figures, logs; sample grids are CelebA-derived: do not
# commit them) and $OUT/nested-wide.tar.gz, $OUT/nested-cpu.tar.gz (the 16x16 checkpoints, for a rerun on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-benchmarks/results/gpu-nested}
WORK=${WORK:-$(mktemp -d)}
PY=${PYTHON:-python3}
TRAIN64=${TRAIN64:-170}
DEADLINE=${DEADLINE:-500}
RES="$WORK/results"
mkdir -p "$OUT" "$RES/logs"
START=$(date +%s)
left() { echo $((START + DEADLINE - $(date +%s))); }
log() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$RES/logs/timeline.txt"; }
mlsde() { "$PY" -m multilevel_sde.cli "$@"; }

pack() {
  log "packing"
  tar -czf "$OUT/results.tar.gz" -C "$RES" . 2>/dev/null
  for ladder in nested-wide nested-cpu; do  # one file each: a file over 16 MB does not come back from the device
    tar -czf "$OUT/$ladder.tar.gz" -C "$WORK" --exclude='*.tmp*' "$ladder" 2>/dev/null || true
  done
  ls -la "$OUT"
}
trap pack EXIT

if [ -z "${CELEBA:-}" ]; then
  CELEBA="$WORK/celeba"
  mkdir -p "$CELEBA"
  tar -xf "${CELEBA_TAR:-../shared/data/celeba-10k.tar}" -C "$CELEBA"
fi
log "device $DEVICE; CelebA in $CELEBA"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
  | tee "$RES/logs/device.txt"

AUTOCAST=()
[ "$DEVICE" != "cpu" ] && AUTOCAST=(--autocast bf16)
TRAIN16=(--data "celeba:$CELEBA" --image-size 16 --steps 4000 --batch-size 64 --lr 5e-4 --warmup 100
         --eval-every 1000 --checkpoint-every 1000 --device "$DEVICE" --no-progress)
PROTOCOL16=(--samplers ddpm --heldout 64 --select 32 --batch 64 --em-steps 10,25,50,100,250,500,750,900,1000
            --learn-steps 12 --learn-batch 32 --learn-grid 100 --deltas=-2,-1,0,1,2 --mlem-steps 50,25,10
            --tstitch-steps 50,25 --device "$DEVICE" --no-progress)

# 0. smoke: every device path the stages use, tiny
log "smoke"
if ! { mlsde train --nested nested-cpu --widths 2,4,8 --data "celeba:$CELEBA" --image-size 16 --steps 20 \
         --batch-size 16 --warmup 5 --eval-every 10 --checkpoint-every 10 --device "$DEVICE" "${AUTOCAST[@]}" \
         --no-progress --out "$WORK/smoke" \
       && mlsde experiment "$WORK/smoke" --out "$RES/smoke" --samplers ddpm --heldout 8 --select 4 --batch 4 \
         --em-steps 5,10,20 --reference-steps 20 --mlem-steps 20 --p-top 0.5,0.2 \
         --strategies inverse-cost,theory,learned,adaptive --stratified inverse-cost --comonotone adaptive \
         --learn-steps 1 --learn-batch 4 --learn-grid 10 --deltas 0,1 --tstitch-fractions 0.5 --tstitch-steps 10 \
         --device "$DEVICE" --no-progress \
       && mlsde experiment "$WORK/smoke" --out "$RES/smoke-batch" --samplers ddpm,ddim --heldout 8 --select 4 \
         --batch 4 --em-steps 5,20 --reference-steps 20 --mlem-steps 20 --p-top 0.5 --coupling batch \
         --strategies inverse-cost,adaptive --learn-steps 1 --tstitch-fractions 0.5 --tstitch-steps 10 \
         --device "$DEVICE" --no-progress; } > "$RES/logs/smoke.log" 2>&1; then
  log "smoke FAILED (logs/smoke.log)"
  tail -40 "$RES/logs/smoke.log"
  exit 1
fi
log "smoke passed"
[ "${SMOKE_ONLY:-0}" = 1 ] && exit 0

# B and C: a 16x16 nested ladder trained with step 12's command, then step 12's experiment on three widths
nested16() {  # nested16 NAME TITLE [TRAIN ARGS...]
  timeout $(( $(left) - 10 )) "$PY" -m multilevel_sde.cli train --nested nested-cpu "${@:3}" "${TRAIN16[@]}" \
    --out "$WORK/$1" > "$RES/logs/$1-train.json" 2> "$RES/logs/$1-train.log"
  log "$1 trained ($?)"
  timeout $(( $(left) - 10 )) "$PY" -m multilevel_sde.cli experiment "$WORK/$1" --out "$RES/celeba16-$1-3" \
    --mlem-networks 0,2,4 "${PROTOCOL16[@]}" --title "$2" --strategies inverse-cost,theory,learned,adaptive \
    --stratified inverse-cost,theory,learned --comonotone inverse-cost,theory,adaptive > "$RES/logs/$1-3.log" 2>&1
  log "$1 experiment ($?)"
}
nested16 nested-wide "CelebA 16x16, one nested UNet of widths 2, 4, 8, 16, 32 trained jointly for 4000 steps, ML-EM on widths 2, 8, 32, DDPM (GPU)" \
  --widths 2,4,8,16,32 &
nested16 nested-cpu "CelebA 16x16, nested-cpu retrained on a GPU (4000 joint steps), ML-EM on widths 3, 10, 24 with the adaptive strategy, DDPM" &

# A. 64x64: time one joint training step, fit the steps to TRAIN64 seconds, train, run the experiment
PROBE=$("$PY" - "$DEVICE" <<'EOF'
import sys, time, torch
from multilevel_sde.diffusion.nested import build_nested, nested_loss
device = sys.argv[1]
net = build_nested("nested-paper", 3, 64, autocast="bf16" if device != "cpu" else None).to(device)
opt = torch.optim.Adam(net.parameters(), 1e-3)
x = torch.randn(256, 3, 64, 64, device=device)
t = torch.randint(1, 1001, (256,), device=device)
def step():
    loss, _ = nested_loss(net(x, t, width="all"), x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
for _ in range(3):
    step()
if device != "cpu":
    torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(5):
    step()
if device != "cpu":
    torch.cuda.synchronize()
print((time.perf_counter() - start) / 5)
EOF
)
STEPS64=$("$PY" -c "print(max(100, min(20000, int($TRAIN64 / (1.15 * $PROBE)))))")
log "A: probe ${PROBE} s per joint step of batch 256 -> $STEPS64 steps"
timeout $(( $(left) - 150 )) "$PY" -m multilevel_sde.cli train --nested nested-paper --data "celeba:$CELEBA" \
  --image-size 64 --steps "$STEPS64" --batch-size 256 --lr 1e-3 --warmup 100 --eval-every 0 \
  --checkpoint-every 500 --device "$DEVICE" "${AUTOCAST[@]}" --no-progress --out "$WORK/nested64" \
  > "$RES/logs/nested64-train.json" 2> "$RES/logs/nested64-train.log"
log "A trained ($?)"
timeout $(( $(left) - 5 )) "$PY" -m multilevel_sde.cli experiment "$WORK/nested64" --out "$RES/celeba64-nested" \
  --samplers ddpm --heldout 64 --select 32 --batch 64 --em-steps 10,25,50,100,250,1000 --mlem-networks 0,2,5 \
  --mlem-steps 50,25 --strategies inverse-cost,theory,adaptive --stratified inverse-cost --comonotone inverse-cost,adaptive \
  --tstitch-steps 50 --device "$DEVICE" --no-progress \
  --title "CelebA 64x64, one nested UNet of widths 16..96 trained jointly for $STEPS64 steps (${TRAIN64} s), ML-EM on widths 16, 32, 96, DDPM (GPU)" \
  > "$RES/logs/nested64-experiment.log" 2>&1
log "A experiment ($?)"
wait
printf '{"command": "bash benchmarks/gpu_nested.sh", "train64_seconds": %s, "probe_seconds_per_step": %s, "steps64": %s, "total_seconds": %d}\n' \
  "$TRAIN64" "$PROBE" "$STEPS64" $(($(date +%s) - START)) > "$RES/timing.json"
log "done"
