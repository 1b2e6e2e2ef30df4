#!/usr/bin/env bash
# shellcheck disable=SC2086  # option strings are split into words on purpose
# Trains the shipped models. Metric path (foundation issue): same budget and seed within the Tiny
# ImageNet ablation (SCE, SCE+NCA, SCE(+)NCA), about 25 minutes each on 2 CPU cores (bf16).
# Gradient path (gradient-adaptation issue): MAML and CxGrad pairs with the same budget per pair.
# Usage: [COMMANDS_ONLY=1] scripts/train-shipped.sh [name ...]   (default: all)
set -euo pipefail
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=67108864 MALLOC_TOP_PAD_=67108864
FEWSHOT=${FEWSHOT:-.venv/bin/fewshot}
THREADS="--threads ${FEWSHOT_THREADS:-0}"  # 0: all cores; the budget is counted in epochs, not time
TI="--dataset tinyimagenet --arch conv4 --width 64 --epochs 10 --batch-classes 32 --batch-shots 4 --lr 0.05 --temperature 64 --seed 0"
OMNI="--dataset omniglot --arch conv4 --width 64 --pools 2 --epochs 40 --batch-classes 32 --batch-shots 4 --lr 0.05 --temperature 64 --seed 0"
OMNI_META="--bn-train support --dataset omniglot --ways 5 --shots 1 --queries 15 --meta-batch 4 --inner-steps 5 --iterations 6000 --val-every 250 --val-tasks 200 --outer-lr 0.001 --seed 0"
# Stage 2 of the Omniglot pair, resumed from stage 1's last checkpoint: 90/180/270-degree rotations as new
# classes (Finn et al. 2017's Omniglot protocol) and a cosine outer-lr decay, counted on the absolute iteration.
OMNI_META_2="${OMNI_META/--iterations 6000/--iterations 11000} --rotations --outer-lr-schedule cosine"
# Stage 3, resumed from stage 2's last checkpoint: the same settings on a longer cosine (the outer lr restarts at
# the value a 17000-iteration cosine has at iteration 11000, 2.8e-4, and decays to 1e-5).
OMNI_META_3="${OMNI_META_2/--iterations 11000/--iterations 17000}"
TI_META="--bn-train support --dataset tinyimagenet --width 32 --ways 5 --shots 5 --queries 15 --meta-batch 2 --inner-steps 5 --iterations 800 --val-every 250 --val-tasks 100 --outer-lr 0.001 --first-order --seed 0"
# The inner-loop models (issue 33): pre-train, then meta-train. Each starts from the shipped direct-sum model of its
# dataset (its convs and BatchNorm, the running statistics frozen in units of each weight's norm, its CL2N / L2N
# transform), the head at that model's nearest centroid with a learned temperature (zero steps answer as the
# centroid); the first three blocks stay fixed (computed once per image), the last block and the head adapt.
# MAML and CxGrad of one dataset share every setting but the rule's own (CxGrad: beta, --rule-lr for g_phi).
TI_BB="--bn-train support --dataset tinyimagenet --ways 5 --shots 5 --queries 15 --meta-batch 4 --inner-steps 5 --iterations 3000 --val-every 500 --val-tasks 200 --init-backbone tinyimagenet-conv4-sce-nca-directsum --head-init centroid --adapt-from 3 --outer-lr 0.0005 --outer-lr-schedule cosine --seed 0"
OMNI_BB="--bn-train support --dataset omniglot --ways 5 --min-ways 2 --max-ways 20 --shots 1 --queries 5 --meta-batch 4 --inner-steps 5 --iterations 2000 --val-every 500 --val-tasks 200 --rotations --init-backbone omniglot-conv4-directsum --head-init centroid --adapt-from 3 --outer-lr 0.0005 --outer-lr-schedule cosine --seed 0"
TI_AB="${TI_BB/--iterations 3000 --val-every 500/--iterations 500 --val-every 250}"
declare -A RUNS=(
  [tinyimagenet-conv4-sce-nca-directsum]="$TI --loss sce --metric nca --combine directsum"
  [omniglot-conv4-directsum]="$OMNI --loss sce --metric nca --combine directsum"
  [tinyimagenet-conv4-sce]="$TI --loss sce --metric none"
  [tinyimagenet-conv4-sce-nca-sum]="$TI --loss sce --metric nca --combine sum"
  [omniglot-conv4-maml]="$OMNI_BB --method maml --alpha 0.1 --head-alpha 1.0"
  [omniglot-conv4-cxgrad]="$OMNI_BB --method cxgrad --alpha 0.1 --head-alpha 1.0 --beta 1.0 --rule-lr 0.01"
  [tinyimagenet-conv4-maml]="$TI_BB --method maml --alpha 0.1 --head-alpha 1.0"
  [tinyimagenet-conv4-cxgrad]="$TI_BB --method cxgrad --alpha 0.1 --head-alpha 1.0 --beta 1.0"
  # the fair comparison's other rows (RESULTS.md, issue 33): MAML with learned per-layer step sizes (what the paper's
  # CxGrad reduces to) and CxGrad with a context that carries the task; same start, budget and settings as the pair above
  [tinyimagenet-conv4-maml-lslr]="$TI_BB --method maml-lslr --alpha 0.1 --head-alpha 1.0"
  [tinyimagenet-conv4-cxgrad-task]="$TI_BB --method cxgrad-task --alpha 0.1 --head-alpha 1.0 --beta 1.0"
  # ablations of the recipe (RESULTS.md, issue 33), MAML and CxGrad each: a sixth of the budget (500 iterations on
  # their own cosine), the base recipe at that budget, a shared learned head instead of the centroid, two blocks adapted
  [ti-maml-ab-base]="$TI_AB --method maml --alpha 0.1 --head-alpha 1.0"
  [ti-cxgrad-ab-base]="$TI_AB --method cxgrad --alpha 0.1 --head-alpha 1.0 --beta 1.0"
  [ti-maml-ab-shared]="${TI_AB/--head-init centroid/--head-init shared} --method maml --alpha 0.1 --head-alpha 1.0"
  [ti-cxgrad-ab-shared]="${TI_AB/--head-init centroid/--head-init shared} --method cxgrad --alpha 0.1 --head-alpha 1.0 --beta 1.0"
  [ti-maml-ab-adapt2]="${TI_AB/--adapt-from 3/--adapt-from 2} --method maml --alpha 0.1 --head-alpha 1.0"
  [ti-cxgrad-ab-adapt2]="${TI_AB/--adapt-from 3/--adapt-from 2} --method cxgrad --alpha 0.1 --head-alpha 1.0 --beta 1.0"
  # CxGrad's scaling network at its own outer learning rate (chosen on validation against ti-cxgrad-ab-base)
  [ti-cxgrad-ab-rulelr]="$TI_AB --method cxgrad --alpha 0.1 --head-alpha 1.0 --beta 1.0 --rule-lr 0.01"
  # the models these replaced (trained from scratch, width 32 on Tiny ImageNet; RESULTS.md, git history before issue 33)
  [omniglot-conv4-maml-scratch]="$OMNI_META --method maml --alpha 0.1"
  [omniglot-conv4-cxgrad-scratch]="$OMNI_META --method cxgrad --alpha 0.01 --beta 1.0"
  [tinyimagenet-conv4-maml-scratch]="$TI_META --method maml --alpha 0.01"
  [tinyimagenet-conv4-cxgrad-scratch]="$TI_META --method cxgrad --alpha 0.01 --beta 1.0"
)
# After stages 2 and 3 the weights of the snapshots of the last 2000 iterations are averaged (fewshot average),
# kept only if the average beats the best single checkpoint on the run's validation tasks.
declare -A LATER=(
  [omniglot-conv4-maml-scratch]="$OMNI_META_2 --method maml --alpha 0.1|average 9000|$OMNI_META_3 --method maml --alpha 0.1|average 15000"
  [omniglot-conv4-cxgrad-scratch]="$OMNI_META_2 --method cxgrad --alpha 0.01 --beta 1.0|average 9000|$OMNI_META_3 --method cxgrad --alpha 0.01 --beta 1.0|average 15000"
)
# A last stage of the inner-loop models (issue 16): fine-tuned with a head that adapts any number of classes
# from the weights the stages above produced, on a short cosine into runs/NAME/HEAD (scripts/package-shipped.sh
# packages that run when it exists). HEAD is what ships (SHIPPED_HEAD: every inner-loop model has Ye and Chao's
# shared row, RESULTS.md) unless HEAD_INIT names one: shared, prototypes (Proto-MAML's, measured and not
# shipped) or learned (no fine-tune).
declare -A SHIPPED_HEAD=([omniglot-conv4-maml-scratch]=shared [omniglot-conv4-cxgrad-scratch]=shared [tinyimagenet-conv4-maml-scratch]=shared
  [tinyimagenet-conv4-cxgrad-scratch]=shared)
PROTO="--outer-lr 0.0005 --outer-lr-schedule cosine"
declare -A FINETUNE=(
  [omniglot-conv4-maml-scratch]="${OMNI_META_2/--iterations 11000/--iterations 1500} --val-every 500 --method maml --alpha 0.1 $PROTO"
  [omniglot-conv4-cxgrad-scratch]="${OMNI_META_2/--iterations 11000/--iterations 1500} --val-every 500 --method cxgrad --alpha 0.01 --beta 1.0 $PROTO"
  [tinyimagenet-conv4-maml-scratch]="${TI_META/--iterations 800/--iterations 600} --val-every 300 --method maml --alpha 0.01 $PROTO"
  [tinyimagenet-conv4-cxgrad-scratch]="${TI_META/--iterations 800/--iterations 600} --val-every 300 --method cxgrad --alpha 0.01 --beta 1.0 $PROTO"
)
# Then, for the heads of any number of classes (SHIPPED_WAYS), episodes of 2..20 classes drawn per episode
# (5 queries per class, so a step costs about what a 5-way 15-query one did), from the fine-tune above into
# runs/NAME/ways; validation at 5 and 20 ways. CxGrad's head takes a larger step (--head-alpha 0.03: IGS
# leaves the head at alpha, RESULTS.md). WAYS=0 skips it. The Tiny ImageNet pair (WAYS_ONLY) skips the
# 5-way fine-tune: its ways stage starts from the learned-head weights (what was measured and shipped).
TI_WAYS="--bn-train support --dataset tinyimagenet --width 32 --ways 5 --min-ways 2 --max-ways 20 --shots 5 --queries 5 --meta-batch 2 --inner-steps 5 --iterations 600 --val-every 300 --val-tasks 100 --first-order --seed 0 $PROTO"
OMNI_WAYS="--bn-train support --dataset omniglot --ways 5 --min-ways 2 --max-ways 20 --shots 1 --queries 5 --meta-batch 4 --inner-steps 5 --iterations 1000 --val-every 250 --val-tasks 200 --seed 0 --rotations $PROTO"
declare -A SHIPPED_WAYS=(
  [omniglot-conv4-maml-scratch]="$OMNI_WAYS --method maml --alpha 0.1"
  [omniglot-conv4-cxgrad-scratch]="$OMNI_WAYS --method cxgrad --alpha 0.01 --head-alpha 0.03 --beta 1.0"
  [tinyimagenet-conv4-maml-scratch]="$TI_WAYS --method maml --alpha 0.01"
  [tinyimagenet-conv4-cxgrad-scratch]="$TI_WAYS --method cxgrad --alpha 0.01 --head-alpha 0.03 --beta 1.0"
)
declare -A WAYS_ONLY=([tinyimagenet-conv4-maml-scratch]=1 [tinyimagenet-conv4-cxgrad-scratch]=1)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(tinyimagenet-conv4-sce-nca-directsum omniglot-conv4-directsum tinyimagenet-conv4-sce tinyimagenet-conv4-sce-nca-sum)
for name in "${names[@]}"; do
  mkdir -p "runs/$name"
  steps=("${RUNS[$name]}")
  if [ -n "${LATER[$name]:-}" ]; then IFS='|' read -r -a later <<< "${LATER[$name]}"; steps+=("${later[@]}"); fi
  head=${HEAD_INIT:-${SHIPPED_HEAD[$name]:-learned}}
  if [ "$head" != learned ] && [ -n "${FINETUNE[$name]:-}" ]; then
    # FINETUNE_ONLY=1: only the last stage, from the shipped model's weights (models/zoo/NAME) instead of
    # runs/NAME/best.pt (a checkout that has not trained the stages above).
    if [ -n "${FINETUNE_ONLY:-}" ]; then steps=(); fi
    [ -n "${WAYS_ONLY[$name]:-}" ] && [ "$head" = shared ] || steps+=("finetune ${FINETUNE[$name]} --head-init $head")
    if [ "$head" != learned ] && [ -n "${SHIPPED_WAYS[$name]:-}" ] && [ "${WAYS:-1}" != 0 ]; then
      steps+=("ways ${SHIPPED_WAYS[$name]} --head-init $head")
    fi
  fi
  init="runs/$name/best.pt"; [ -z "${FINETUNE_ONLY:-}" ] || init="$name"
  ways_init="runs/$name/$head/best.pt"; [ -z "${WAYS_ONLY[$name]:-}" ] || ways_init=$init
  for i in "${!steps[@]}"; do
    case ${steps[$i]} in
      average*) echo "fewshot average --run runs/$name --from-iteration ${steps[$i]#average }" ;;
      finetune*) echo "fewshot train ${steps[$i]#finetune } --init-from $init --out runs/$name/$head" ;;
      ways*) echo "fewshot train ${steps[$i]#ways } --init-from $ways_init --out runs/$name/ways" ;;
      *) echo "fewshot train ${steps[$i]} --out runs/$name$([ "$i" = 0 ] || echo ' --resume')" ;;
    esac
  done | tr -s ' ' | paste -sd'&' | sed 's/&/ \&\& /g' > "runs/$name/command.txt"
  echo "== $name: $(cat "runs/$name/command.txt")"
  [ -z "${COMMANDS_ONLY:-}" ] || continue  # COMMANDS_ONLY=1: write runs/NAME/command.txt, train nothing
  for step in "${steps[@]}"; do
    case $step in
      average*) $FEWSHOT average --run "runs/$name" --from-iteration "${step#average }" ;;
      finetune*) $FEWSHOT train ${step#finetune } $THREADS --init-from "$init" --out "runs/$name/$head" --resume ;;
      ways*) $FEWSHOT train ${step#ways } $THREADS --init-from "$ways_init" --out "runs/$name/ways" --resume ;;
      *) $FEWSHOT train $step $THREADS --out "runs/$name" --resume ;;
    esac
  done
done
