#!/usr/bin/env bash
# The paper's setting on one GPU: train a 5-network UNet ladder on CelebA 64x64 from scratch, then run the
# EM vs ML-EM experiment (DDPM and DDIM). Results and figures only go to $OUT (never data or weights).
#
#   bash benchmarks/gpu_celeba64.sh                      # on an H200: about 10 minutes
#   SIZE=16 STEPS=20 HELDOUT=4 TINY=1 DEVICE=cpu bash benchmarks/gpu_celeba64.sh   # CPU smoke test (~3 min)
#   SELECTED=1 bash benchmarks/gpu_celeba64.sh           # + the weight-selection lever (step 3; more minutes)
#   NESTED=1 bash benchmarks/gpu_celeba64.sh             # + one nested UNet whose widths are the ladder (step 4)
#
# Settings (environment): CELEBA (a CelebA folder; default: unpack ../shared/data/celeba-10k.tar),
# OUT (default benchmarks/results/celeba64-gpu), WORK (checkpoints; default a temporary folder), SIZE (64),
# STEPS (training steps per network), BATCH (training batch), HELDOUT (held-out images), DEVICE (cuda),
# PRESETS (the ladder), TINY=1 (a minimal experiment for smoke tests), SELECTED=1 (step 3: students started from
# the top network's weights; SELECTED_PRESETS, default paper-2,paper-3: widths 32 and 48 of the top's 96),
# NESTED=1 (step 4: the nested-paper NestedUNet, widths 16..96, trained jointly for NESTED_STEPS, default STEPS).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-64}
STEPS=${STEPS:-3000}
BATCH=${BATCH:-256}
HELDOUT=${HELDOUT:-256}
DEVICE=${DEVICE:-cuda}
PRESETS=${PRESETS:-paper-1,paper-2,paper-3,paper-4,paper-5}
OUT=${OUT:-benchmarks/results/celeba64-gpu}
WORK=${WORK:-$(mktemp -d)}
PY=${PYTHON:-python}
AUTOCAST=()
[ "$DEVICE" != "cpu" ] && AUTOCAST=(--autocast bf16)

if [ -z "${CELEBA:-}" ]; then
  CELEBA="$WORK/celeba"
  mkdir -p "$CELEBA"
  tar -xf ../shared/data/celeba-10k.tar -C "$CELEBA"
fi
mkdir -p "$OUT"
START=$(date +%s)

# 1. the ladder, cheapest first (each network trained separately on the eps loss, as in the paper)
"$PY" -m multilevel_sde.cli train --preset "$PRESETS" --data "celeba:$CELEBA" --image-size "$SIZE" \
  --steps "$STEPS" --batch-size "$BATCH" --lr 1e-3 --warmup 100 --eval-every 0 --checkpoint-every 0 \
  --device "$DEVICE" "${AUTOCAST[@]}" --no-progress --out "$WORK/ladder" > "$OUT/train.json"
TRAINED=$(date +%s)

# 2. the experiment (held-out noises for every point; learning on a separate selection set)
if [ "${TINY:-0}" = "1" ]; then
  SIZES=(--em-steps 10,20 --reference-steps 20 --mlem-steps 20 --p-top 0.5,0.2 --learn-steps 1 --learn-grid 10
         --deltas 0,1 --tstitch-fractions 0.5 --tstitch-steps 20 --select "$HELDOUT" --batch "$HELDOUT")
else
  # the levers that paid on CelebA 16x16 (docs/experiments.md): stratified coins for every strategy, and ML-EM
  # respaced to few steps, where the top network's EM frontier lies
  SIZES=(--select 128 --batch "$HELDOUT" --learn-steps 30 --learn-batch 128 --learn-grid 250
         --mlem-steps 1000,250,50,25 --stratified inverse-cost,theory,learned --tstitch-steps 1000,250,50,25)
fi
"$PY" -m multilevel_sde.cli experiment "$WORK/ladder" --out "$OUT" --heldout "$HELDOUT" --device "$DEVICE" \
  --title "CelebA ${SIZE}x${SIZE}, ${PRESETS} (GPU)" --no-progress "${SIZES[@]}"
END=$(date +%s)
printf '{"train_seconds": %d, "experiment_seconds": %d, "device": "%s", "command": "%s"}\n' \
  $((TRAINED - START)) $((END - TRAINED)) "$DEVICE" "SIZE=$SIZE STEPS=$STEPS BATCH=$BATCH HELDOUT=$HELDOUT bash benchmarks/gpu_celeba64.sh" \
  > "$OUT/timing.json"
echo "done in $((END - START)) s: $OUT/report.md"

# 3. (SELECTED=1) the lever that paid most on CPU (docs/experiments.md): the two smaller ML-EM networks started
#    from the top network's weights (weight selection) and distilled from it, with the same budget, then the
#    same experiment on (both students, the top network) into $OUT/selected
if [ "${SELECTED:-0}" = "1" ]; then
  LEVELS=$(echo "$PRESETS" | tr ',' '\n' | grep -c .)
  TOP="$WORK/ladder/level_$((LEVELS - 1))/checkpoint.pt"
  STUDENTS=()
  for preset in $(echo "${SELECTED_PRESETS:-paper-2,paper-3}" | tr ',' ' '); do
    "$PY" -m multilevel_sde.cli train --preset "$preset" --data "celeba:$CELEBA" --image-size "$SIZE" \
      --steps "$STEPS" --batch-size "$BATCH" --lr 1e-3 --warmup 100 --eval-every 0 --checkpoint-every 0 \
      --device "$DEVICE" "${AUTOCAST[@]}" --no-progress --distill-from "$TOP" --init-from "$TOP" \
      --out "$WORK/selected/$preset" > "$OUT/selected-$preset.json"
    STUDENTS+=("$WORK/selected/$preset")
  done
  SELECTED_TRAINED=$(date +%s)
  "$PY" -m multilevel_sde.cli experiment "${STUDENTS[@]}" "$TOP" --out "$OUT/selected" --heldout "$HELDOUT" \
    --device "$DEVICE" --title "CelebA ${SIZE}x${SIZE}, ${SELECTED_PRESETS:-paper-2,paper-3} initialised from the top network's weights and distilled (GPU)" \
    --no-progress "${SIZES[@]}"
  SELECTED_END=$(date +%s)
  printf '{"train_seconds": %d, "experiment_seconds": %d}\n' $((SELECTED_TRAINED - END)) \
    $((SELECTED_END - SELECTED_TRAINED)) > "$OUT/selected/timing.json"
  echo "done in $((SELECTED_END - START)) s: $OUT/selected/report.md"
fi

# 4. (NESTED=1) a ladder built for ML-EM: one NestedUNet (nested-paper: widths 16, 24, 32, 48, 64, 96 of one set of
#    weights, every width trained at each step, the smaller ones regressing the top's eps), then the same
#    experiment over all its widths into $OUT/nested
if [ "${NESTED:-0}" = "1" ]; then
  NESTED_START=$(date +%s)
  "$PY" -m multilevel_sde.cli train --nested nested-paper --data "celeba:$CELEBA" --image-size "$SIZE" \
    --steps "${NESTED_STEPS:-$STEPS}" --batch-size "$BATCH" --lr 1e-3 --warmup 100 --eval-every 0 \
    --checkpoint-every 0 --device "$DEVICE" "${AUTOCAST[@]}" --no-progress --out "$WORK/nested" \
    > "$OUT/nested-train.json"
  NESTED_TRAINED=$(date +%s)
  "$PY" -m multilevel_sde.cli experiment "$WORK/nested" --out "$OUT/nested" --heldout "$HELDOUT" \
    --device "$DEVICE" --mlem-networks 0,1,2,3,4,5 --title "CelebA ${SIZE}x${SIZE}, nested-paper (GPU)" \
    --no-progress "${SIZES[@]}"
  NESTED_END=$(date +%s)
  printf '{"train_seconds": %d, "experiment_seconds": %d}\n' $((NESTED_TRAINED - NESTED_START)) \
    $((NESTED_END - NESTED_TRAINED)) > "$OUT/nested/timing.json"
  echo "done in $((NESTED_END - START)) s: $OUT/nested/report.md"
fi
