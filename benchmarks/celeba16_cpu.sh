#!/usr/bin/env bash
# The CPU run on CelebA 16x16: train the five cpu-* UNets (each on its own, as in the paper), then run the
# experiment for DDPM and DDIM side by side (one process and one thread each, on a 2-core machine).
# Results and figures go to benchmarks/results/celeba16-cpu/{ddpm,ddim}; checkpoints stay in $WORK.
#
#   CELEBA=/path/to/img_align_celeba_parent bash benchmarks/celeba16_cpu.sh     # about 1.5 h on 2 cores
#   (plus the distillation levers, steps 3-11: ~2.6 h of training and eleven ~20-min experiments; DISTILLED=0 skips
#   them; steps 12-14, the nested ladders: ~1 h of training and one or two experiments each; NESTED=1 runs them even
#   with DISTILLED=0)
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-/tmp/runs}
OUT=${OUT:-benchmarks/results/celeba16-cpu}
PY=${PYTHON:-python}
if [ -z "${CELEBA:-}" ]; then
  CELEBA="$WORK/celeba"
  mkdir -p "$CELEBA"
  [ -d "$CELEBA/img_align_celeba" ] || tar -xf ../shared/data/celeba-10k.tar -C "$CELEBA"
fi

# 1. the ladder (a finished level is reused)
"$PY" -m multilevel_sde.cli train --family cpu --data "celeba:$CELEBA" --image-size 16 --steps 3000 \
  --batch-size 64 --lr 5e-4 --warmup 100 --eval-every 1000 --checkpoint-every 500 --out "$WORK/celeba16" \
  --no-progress > "$WORK/celeba16-train.json"

# 2. the experiment, one sampler per process
mkdir -p "$OUT"
ARGS=(--heldout 64 --select 32 --batch 64 --em-steps 10,25,50,100,250,500,750,900,1000 --mlem-steps 1000,250
      --learn-steps 12 --learn-batch 32
      --learn-grid 100 --deltas=-2,-1,0,1,2 --no-progress)
for sampler in ddpm ddim; do
  OMP_NUM_THREADS=1 "$PY" -m multilevel_sde.cli experiment "$WORK/celeba16" --out "$OUT/$sampler" \
    --samplers "$sampler" --title "CelebA 16x16, cpu-xs..cpu-xl, ${sampler^^} (CPU)" "${ARGS[@]}" \
    > "$OUT/$sampler.log" 2>&1 &
done
wait
echo "done: $OUT/ddpm/report.md $OUT/ddim/report.md"

# 3. the distillation lever: cpu-xs and cpu-m distilled from the top network (cpu-xl, level_4) with the same
#    budget (3000 steps), then ML-EM on (xs distilled, m distilled, xl) for DDPM, every strategy also with
#    stratified coins, and on respaced grids down to 10 steps (the top network's EM frontier lies there)
if [ "${DISTILLED:-1}" = 1 ]; then
  TOP="$WORK/celeba16/level_4/checkpoint.pt"
  distill() {  # distill PRESET LEVEL FOLDER STEPS EVAL_EVERY CHECKPOINT_EVERY [TRAIN ARGS...]: train (or resume)
    #            FOLDER/LEVEL from the top network, on THREADS threads (default 1)
    OMP_NUM_THREADS=${THREADS:-1} "$PY" -m multilevel_sde.cli train --preset "$1" --data "celeba:$CELEBA" \
      --image-size 16 --steps "$4" --batch-size 64 --lr 5e-4 --warmup 100 --eval-every "$5" \
      --checkpoint-every "$6" --distill-from "$TOP" --out "$3/$2" --no-progress "${@:7}" > "$3-$2.json"
  }
  distill cpu-xs level_0 "$WORK/celeba16-distill" 3000 1000 500
  distill cpu-m level_2 "$WORK/celeba16-distill" 3000 1000 500
  "$PY" -m multilevel_sde.cli experiment "$WORK/celeba16-distill/level_0" "$WORK/celeba16-distill/level_2" \
    "$WORK/celeba16/level_4" --out "$OUT/ddpm-distilled" --samplers ddpm \
    --title "CelebA 16x16, cpu-xs and cpu-m distilled from cpu-xl, DDPM (CPU)" "${ARGS[@]}" \
    --mlem-steps 1000,250,100,50,25,10 --stratified inverse-cost,theory,learned --tstitch-steps 1000,250,100,50,25 \
    > "$OUT/ddpm-distilled.log" 2>&1
  echo "done: $OUT/ddpm-distilled/report.md"
  "$PY" -m multilevel_sde.cli experiment "$WORK/celeba16-distill/level_0" "$WORK/celeba16-distill/level_2" \
    "$WORK/celeba16/level_4" --out "$OUT/ddim-distilled" --samplers ddim \
    --title "CelebA 16x16, cpu-xs and cpu-m distilled from cpu-xl, DDIM (CPU)" "${ARGS[@]}" \
    --mlem-steps 100,50,25,10 --stratified inverse-cost,theory,learned --tstitch-steps 100,50,25 \
    > "$OUT/ddim-distilled.log" 2>&1

  # 4. the schedule learned on the 25-step grid it is used on (same ladder; neutral)
  "$PY" -m multilevel_sde.cli experiment "$WORK/celeba16-distill/level_0" "$WORK/celeba16-distill/level_2" \
    "$WORK/celeba16/level_4" --out "$OUT/ddpm-distilled-learn25" --samplers ddpm \
    --title "CelebA 16x16, distilled ladder, schedule learned on the 25-step grid, DDPM (CPU)" --heldout 64 \
    --select 32 --batch 64 --em-steps 10,25,50,100,250,500,1000 --mlem-steps 50,25,10 --strategies learned \
    --stratified learned --learn-steps 12 --learn-batch 32 --learn-grid 25 --deltas=-2,-1,0,1,2 \
    --tstitch-fractions 0.2,0.4,0.6,0.8 --tstitch-steps 25 --no-progress > "$OUT/ddpm-distilled-learn25.log" 2>&1

  # 5. longer distillation: step 3's students trained on to 12000 steps (resumed from their checkpoints), then
  #    the experiment on the grids that paid
  mkdir -p "$WORK/celeba16-distill12k"
  for spec in "cpu-xs level_0" "cpu-m level_2"; do
    set -- $spec
    [ -d "$WORK/celeba16-distill12k/$2" ] || cp -r "$WORK/celeba16-distill/$2" "$WORK/celeba16-distill12k/$2"
    distill "$1" "$2" "$WORK/celeba16-distill12k" 12000 3000 1000
  done
  "$PY" -m multilevel_sde.cli experiment "$WORK/celeba16-distill12k/level_0" "$WORK/celeba16-distill12k/level_2" \
    "$WORK/celeba16/level_4" --out "$OUT/ddpm-distilled-12k" --samplers ddpm \
    --title "CelebA 16x16, cpu-xs and cpu-m distilled from cpu-xl for 12000 steps, DDPM (CPU)" "${ARGS[@]}" \
    --mlem-steps 100,50,25,10 --stratified inverse-cost,theory,learned --tstitch-steps 100,50,25 \
    > "$OUT/ddpm-distilled-12k.log" 2>&1
  echo "done: $OUT/ddpm-distilled-12k/report.md"

  # 6. more and closer levels: cpu-s and cpu-l distilled like step 3 (3000 steps, one core each), then the
  #    experiment on the five-network distilled ladder with ML-EM on the three closest to the top (m, l, xl)
  distill cpu-s level_1 "$WORK/celeba16-distill" 3000 1000 500 &
  distill cpu-l level_3 "$WORK/celeba16-distill" 3000 1000 500 &
  wait
  "$PY" -m multilevel_sde.cli experiment "$WORK/celeba16-distill/level_0" "$WORK/celeba16-distill/level_1" \
    "$WORK/celeba16-distill/level_2" "$WORK/celeba16-distill/level_3" "$WORK/celeba16/level_4" \
    --out "$OUT/ddpm-distilled-closer" --samplers ddpm --mlem-networks 2,3,4 \
    --title "CelebA 16x16, cpu-xs..cpu-l distilled from cpu-xl, ML-EM on (m, l, xl), DDPM (CPU)" "${ARGS[@]}" \
    --mlem-steps 50,25,10 --stratified inverse-cost,theory,learned --tstitch-steps 50,25 \
    > "$OUT/ddpm-distilled-closer.log" 2>&1
  echo "done: $OUT/ddpm-distilled-closer/report.md"

  # 7. one coin per level for a whole batch (the paper's batching): the levels run on the whole batch or not
  #    at all, no sub-batches. Batches of 16 held-out images, so that every ML-EM point averages 4 coin
  #    patterns (its +- is between patterns); the schedule is learned as in step 3 (22 min, one core)
  OMP_NUM_THREADS=1 "$PY" -m multilevel_sde.cli experiment "$WORK/celeba16-distill/level_0" \
    "$WORK/celeba16-distill/level_2" "$WORK/celeba16/level_4" --out "$OUT/ddpm-distilled-batch" --samplers ddpm \
    --coupling batch --title "CelebA 16x16, distilled ladder, one coin per level for each batch of 16, DDPM (CPU)" \
    --heldout 64 --select 32 --batch 16 --em-steps 10,25,50,100,250,500,750,900,1000 --mlem-steps 50,25,10 \
    --stratified inverse-cost,theory,learned --learn-steps 12 --learn-batch 32 --learn-grid 100 \
    --deltas=-2,-1,0,1,2 --tstitch-steps 50,25 > "$OUT/ddpm-distilled-batch.log" 2>&1
  echo "done: $OUT/ddpm-distilled-batch/report.md"

  # 8. students started from the top network's own weights (weight selection: every r-th channel, the first
  #    blocks) and then distilled exactly like step 3; cpu-m came out closer to the top than step 3's, cpu-xs
  #    (a sixth of the width) farther, so the experiment runs on (step 3's xs, selected m, xl), on the grids
  #    that paid
  selected_experiment() {  # selected_experiment M_FOLDER NAME TITLE [SMALLEST]: ML-EM on (SMALLEST, default step
    #                         3's xs, M_FOLDER/level_2, xl), on THREADS threads (default: torch's)
    env ${THREADS:+OMP_NUM_THREADS=$THREADS} "$PY" -m multilevel_sde.cli experiment \
      "${4:-$WORK/celeba16-distill/level_0}" "$1/level_2" "$WORK/celeba16/level_4" \
      --out "$OUT/$2" --samplers ddpm --title "$3" "${ARGS[@]}" --mlem-steps 50,25,10 \
      --stratified inverse-cost,theory,learned --tstitch-steps 50,25 > "$OUT/$2.log" 2>&1
    echo "done: $OUT/$2/report.md"
  }
  distill cpu-xs level_0 "$WORK/celeba16-select" 3000 1000 500 --init-from "$TOP" &
  distill cpu-m level_2 "$WORK/celeba16-select" 3000 1000 500 --init-from "$TOP" &
  wait
  selected_experiment "$WORK/celeba16-select" ddpm-selected \
    "CelebA 16x16, cpu-xs distilled, cpu-m initialised from cpu-xl's weights and distilled, DDPM (CPU)"

  # 9. the selected cpu-m trained on to 6000 steps (resumed from step 8's checkpoint; two threads), same experiment
  mkdir -p "$WORK/celeba16-select6k"
  [ -d "$WORK/celeba16-select6k/level_2" ] || cp -r "$WORK/celeba16-select/level_2" "$WORK/celeba16-select6k/level_2"
  THREADS=2 distill cpu-m level_2 "$WORK/celeba16-select6k" 6000 1000 1000 --init-from "$TOP"
  selected_experiment "$WORK/celeba16-select6k" ddpm-selected-6k \
    "CelebA 16x16, cpu-xs distilled, cpu-m initialised from cpu-xl's weights and distilled for 6000 steps, DDPM (CPU)"

  # 10. the selected cpu-m trained on to 12000 steps (two threads), then the experiment with step 3's xs and with
  #     step 5's 12000-step xs, side by side (one thread each); and a learning-rate decay check: the 12000-step
  #     cpu-m trained on to 13500 steps with a constant rate and with --decay 1500, side by side
  #     (select-train.json's lr_decay_check)
  mkdir -p "$WORK/celeba16-select12k"
  [ -d "$WORK/celeba16-select12k/level_2" ] || cp -r "$WORK/celeba16-select6k/level_2" "$WORK/celeba16-select12k/level_2"
  THREADS=2 distill cpu-m level_2 "$WORK/celeba16-select12k" 12000 1000 1000 --init-from "$TOP"
  THREADS=1 selected_experiment "$WORK/celeba16-select12k" ddpm-selected-12k \
    "CelebA 16x16, cpu-xs distilled, cpu-m initialised from cpu-xl's weights and distilled for 12000 steps, DDPM (CPU)" &
  THREADS=1 selected_experiment "$WORK/celeba16-select12k" ddpm-selected-12k-xs12k \
    "CelebA 16x16, cpu-xs distilled for 12000 steps, cpu-m initialised from cpu-xl's weights and distilled for 12000 steps, DDPM (CPU)" \
    "$WORK/celeba16-distill12k/level_0" &
  wait
  for decay in 0 1500; do
    mkdir -p "$WORK/celeba16-decay$decay"
    [ -d "$WORK/celeba16-decay$decay/level_2" ] || cp -r "$WORK/celeba16-select12k/level_2" "$WORK/celeba16-decay$decay/"
    distill cpu-m level_2 "$WORK/celeba16-decay$decay" 13500 500 500 --init-from "$TOP" --decay "$decay" &
  done
  wait

  # 11. a closer smallest rung? cpu-s started from the top network's weights (r = 3) ends farther from it than
  #     step 6's random-start distilled cpu-s (select-train.json), so the experiment runs on (step 6's s, step
  #     10's m, xl)
  THREADS=2 distill cpu-s level_1 "$WORK/celeba16-select-s" 3000 1000 500 --init-from "$TOP"
  selected_experiment "$WORK/celeba16-select12k" ddpm-selected-12k-s \
    "CelebA 16x16, cpu-s distilled, cpu-m initialised from cpu-xl's weights and distilled for 12000 steps, DDPM (CPU)" \
    "$WORK/celeba16-distill/level_1"
fi

# 12. a ladder built for ML-EM (NESTED=1, or with the levers above): one NestedUNet (nested-cpu: widths 3, 6, 10,
#     16, 24 of one set of weights, 0.7-12.9 MFLOPs), every width trained at each step -- the top on the eps loss,
#     the others regressing the top's eps -- for 4000 steps (a smaller budget than steps 8-10's ladder), then
#     the experiment of step 10 with ML-EM over all five widths and over three (3, 10, 24), side by side
if [ "${DISTILLED:-1}" = 1 ] || [ "${NESTED:-0}" = 1 ]; then
  OMP_NUM_THREADS=${THREADS:-1} "$PY" -m multilevel_sde.cli train --nested nested-cpu --data "celeba:$CELEBA" \
    --image-size 16 --steps 4000 --batch-size 64 --lr 5e-4 --warmup 100 --eval-every 1000 --checkpoint-every 500 \
    --out "$WORK/celeba16-nested" --no-progress > "$WORK/celeba16-nested.json"
  cp "$WORK/celeba16-nested/log.json" "$OUT/nested-train-log.json"
  nested_experiment() {  # nested_experiment NAME NETWORKS TITLE [EXPERIMENT ARGS...]
    OMP_NUM_THREADS=1 "$PY" -m multilevel_sde.cli experiment "$WORK/celeba16-nested" --out "$OUT/$1" \
      --samplers ddpm --mlem-networks "$2" --title "$3" "${ARGS[@]}" --mlem-steps 50,25,10 \
      --stratified inverse-cost,theory,learned --tstitch-steps 50,25 "${@:4}" > "$OUT/$1.log" 2>&1
    echo "done: $OUT/$1/report.md"
  }
  nested_experiment ddpm-nested 0,1,2,3,4 \
    "CelebA 16x16, one nested UNet trained jointly for 4000 steps, ML-EM on all five widths, DDPM (CPU)" &
  nested_experiment ddpm-nested-3 0,2,4 \
    "CelebA 16x16, one nested UNet trained jointly for 4000 steps, ML-EM on widths 3, 10, 24, DDPM (CPU)" \
    --comonotone inverse-cost,theory &  # (the comonotone points were added by a second run on the cached points)
  wait
fi

# 13. a wider nested ladder (NESTED=1, or with the levers above): widths 2, 4, 8, 16, 32 (0.36-22 MFLOPs, 61x from
#     the smallest to the top), the same 4000 joint steps, then ML-EM on widths 2, 8, 32 with Giles' adaptive rule
#     beside learned p, stratified and comonotone coins
if [ "${DISTILLED:-1}" = 1 ] || [ "${NESTED:-0}" = 1 ]; then
  OMP_NUM_THREADS=${THREADS:-1} "$PY" -m multilevel_sde.cli train --nested nested-cpu --widths 2,4,8,16,32 \
    --data "celeba:$CELEBA" --image-size 16 --steps 4000 --batch-size 64 --lr 5e-4 --warmup 100 --eval-every 1000 \
    --checkpoint-every 500 --out "$WORK/celeba16-nested-wide" --no-progress > "$WORK/celeba16-nested-wide.json"
  cp "$WORK/celeba16-nested-wide/log.json" "$OUT/nested-wide-train-log.json"
  OMP_NUM_THREADS=1 "$PY" -m multilevel_sde.cli experiment "$WORK/celeba16-nested-wide" --out "$OUT/ddpm-nested-wide-3" \
    --samplers ddpm --mlem-networks 0,2,4 "${ARGS[@]}" --mlem-steps 50,25,10 \
    --title "CelebA 16x16, one nested UNet of widths 2, 4, 8, 16, 32 trained jointly for 4000 steps, ML-EM on widths 2, 8, 32, DDPM (CPU)" \
    --strategies inverse-cost,theory,learned,adaptive --stratified inverse-cost,theory,learned \
    --comonotone inverse-cost,theory,adaptive --tstitch-steps 50,25 > "$OUT/ddpm-nested-wide-3.log" 2>&1
  echo "done: $OUT/ddpm-nested-wide-3/report.md"
fi

# 14. the training options of step 12's ladder that aim at ML-EM's variance (NESTED=1, or with the levers above):
#     --nested-target next (each smaller width regresses the next larger width's eps: the rung-to-rung distance
#     ML-EM pays for) and --rung-weight 4 (the smaller widths' losses weighed 4x beside the top's), each 4000 joint
#     steps like step 12, then step 12's experiment on widths 3, 10, 24
if [ "${DISTILLED:-1}" = 1 ] || [ "${NESTED:-0}" = 1 ]; then
  for variant in "next --nested-target next" "rw4 --rung-weight 4"; do
    set -- $variant
    OMP_NUM_THREADS=${THREADS:-1} "$PY" -m multilevel_sde.cli train --nested nested-cpu "${@:2}" --data "celeba:$CELEBA" \
      --image-size 16 --steps 4000 --batch-size 64 --lr 5e-4 --warmup 100 --eval-every 1000 --checkpoint-every 500 \
      --out "$WORK/celeba16-nested-$1" --no-progress > "$WORK/celeba16-nested-$1.json"
    cp "$WORK/celeba16-nested-$1/log.json" "$OUT/nested-$1-train-log.json"
    OMP_NUM_THREADS=1 "$PY" -m multilevel_sde.cli experiment "$WORK/celeba16-nested-$1" --out "$OUT/ddpm-nested-$1-3" \
      --samplers ddpm --mlem-networks 0,2,4 "${ARGS[@]}" --mlem-steps 50,25,10 \
      --title "CelebA 16x16, one nested UNet trained jointly for 4000 steps (${*:2}), ML-EM on widths 3, 10, 24, DDPM (CPU)" \
      --strategies inverse-cost,theory,learned --stratified inverse-cost,theory,learned \
      --comonotone inverse-cost,theory --tstitch-steps 50,25 > "$OUT/ddpm-nested-$1-3.log" 2>&1 &
  done
  wait
fi

# 15. the noise-model bound: from the committed points of the three-network experiments above (and the main job's
#     digits ladder), how far any grid and any constant probabilities could take unbiased ML-EM, and how much closer
#     the rungs would have to be for 4x (no sampling: seconds)
"$PY" benchmarks/coin_noise_ceiling.py "$OUT/ddpm-nested-3" "$OUT/ddpm-nested-wide-3" "$OUT/ddpm-nested-rw4-3" \
  "$OUT/ddpm-nested-next-3" "$OUT/ddpm-selected-12k-xs12k" benchmarks/results/demo-digits16/three-widths \
  --out "$OUT/coin_noise_ceiling.json" > "$OUT/coin_noise_ceiling.log"
