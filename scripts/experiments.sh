#!/usr/bin/env bash
# The runs behind the README's result tables, one section per table (after scripts/setup.sh):
#
#   bash scripts/experiments.sh is2re       # FLT / Performer / exact on EMT-IS2RE (~10 min each)
#   bash scripts/experiments.sh periodic    # images vs reciprocal (DESIGN §7), 3 seeds each (~7 min per run idle)
#   bash scripts/experiments.sh crossover   # IS2RE s/step vs tokens, the three attentions
#   bash scripts/experiments.sh s2ef        # forces: local vs random-feature context, relax, NVE, cost (~1 h)
#   bash scripts/experiments.sh lm          # the seven LM recipes x 3 seeds (~2-4 min per run)
#   bash scripts/experiments.sh vit         # the three ViT recipes
#   bash scripts/experiments.sh bench       # attention (Fig. 1), RPE error (Thm 4.2), data pipeline
#   bash scripts/experiments.sh viz         # LM attention maps + locality, local RPE shapes
#   bash scripts/experiments.sh optim       # learned optimisers: meta-train + evaluate
#   bash scripts/experiments.sh optim-long  # the same with 50-step truncations
#
# Everything single-threaded (OMP_NUM_THREADS=1): on this shared 2-core machine two threads per
# process contend and run slower. Outputs go to runs/ (not versioned).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
FLT=.venv/bin/flt-mol
PY=.venv/bin/python

section=${1:?usage: scripts/experiments.sh is2re|periodic|crossover|s2ef|lm|vit|bench|viz|optim|optim-long}
case "$section" in
  periodic)
    # The FLT recipe with image tokens against the exactly periodic reciprocal-lattice RPE, seeds
    # 0-2, then the representation check (same crystal, other representation) through
    # convert / predict on 200 val_id structures, and the periodic RPE error (Thm 4.2).
    for seed in 0 1 2; do
      for mode in images reciprocal; do
        out=runs/periodic/${mode}_s$seed
        extra=(model.periodic=$mode data.periodic_images=$([ $mode = images ] && echo true || echo false))
        [ -f "$out/metrics.json" ] || "$FLT" train recipes/emt_is2re_flt.yaml --out "$out" run.seed=$seed "${extra[@]}"
      done
    done
    for mode in images reciprocal; do
      "$PY" -m flt_mol.train.representation runs/periodic/${mode}_s0/checkpoint.pt --max-items 200 \
        --out runs/periodic/representation_$mode.json
    done
    "$FLT" bench rpe --lengths 128 512 --families gaussian_basis_mixture gaussian_basis_slab gaussian_basis_periodic \
      --out runs/bench/rpe_periodic.json --plot runs/bench/rpe_periodic.png
    ;;
  is2re)
    for m in flt performer exact; do
      out=runs/emt_is2re_$m
      "$FLT" train recipes/emt_is2re_$m.yaml --out "$out"
      "$FLT" evaluate "$out/checkpoint.pt" --out "$out/eval.json" --plot "$out/parity.png"
      "$PY" -m flt_mol.train.invariance "$out/checkpoint.pt" --out "$out/invariance.json"
    done
    ;;
  s2ef)
    # README "Forces": the S2EF recipe (context: local) seeds 0-2 and context: features seed 0,
    # then with the seed-0 local model: relaxations of 50 val_id systems beside EMT and a direct
    # IS2RE model, an NVE run, the translation check, and the cost per relaxation step.
    for seed in 0 1 2; do
      out=runs/s2ef/local_s$seed
      [ -f "$out/metrics.json" ] || "$FLT" train recipes/emt_s2ef_flt.yaml --out "$out" run.seed=$seed
    done
    [ -f runs/s2ef/features_s0/metrics.json ] || "$FLT" train recipes/emt_s2ef_flt.yaml --out runs/s2ef/features_s0 model.context=features
    for seed in 1 2; do
      out=runs/s2ef/features_s$seed
      [ -f "$out/metrics.json" ] || "$FLT" train recipes/emt_s2ef_flt.yaml --out "$out" model.context=features run.seed=$seed
    done
    # Variants (not defaults): fairchem's 1:100 loss at 1:10, and 3,000 steps.
    [ -f runs/s2ef/local_fc10_s0/metrics.json ] || "$FLT" train recipes/emt_s2ef_flt.yaml --out runs/s2ef/local_fc10_s0 data.force_coefficient=10
    [ -f runs/s2ef/local_3k_s0/metrics.json ] || "$FLT" train recipes/emt_s2ef_flt.yaml --out runs/s2ef/local_3k_s0 run.steps=3000 run.eval_interval=1000
    "$FLT" relax runs/s2ef/local_3k_s0/best.pt --data emt:val_id --limit 50 --steps 150 --fmax 0.05 --compare-emt \
      --out runs/s2ef/relax_local_3k_s0 --no-progress
    # Variants for the adsorbate (README: none helps): force weight 5 and 10, width 128, cutoff 8 A.
    for v in "aw5 data.adsorbate_force_weight=5" "aw10 data.adsorbate_force_weight=10" \
             "w128 model.embed_dim=128 model.ffn_dim=256" "rc8 model.context_cutoff=8.0"; do
      set -- $v
      name=$1; shift
      [ -f runs/s2ef/local_${name}_s0/metrics.json ] || "$FLT" train recipes/emt_s2ef_flt.yaml --out runs/s2ef/local_${name}_s0 "$@"
      "$FLT" relax runs/s2ef/local_${name}_s0/best.pt --data emt:val_id --limit 50 --steps 150 --fmax 0.05 --compare-emt \
        --out runs/s2ef/relax_local_${name}_s0 --no-progress
    done
    [ -f runs/emt_is2re_flt/best.pt ] || "$FLT" train recipes/emt_is2re_flt.yaml --out runs/emt_is2re_flt
    ckpt=runs/s2ef/local_s0/best.pt
    "$FLT" relax "$ckpt" --data emt:val_id --limit 50 --steps 150 --fmax 0.05 --compare-emt \
      --is2re-checkpoint runs/emt_is2re_flt/best.pt --out runs/s2ef/relax_local_s0 --no-progress
    "$FLT" relax runs/s2ef/features_s0/best.pt --data emt:val_id --limit 50 --steps 150 --fmax 0.05 \
      --out runs/s2ef/relax_features_s0 --no-progress
    "$FLT" md "$ckpt" --data emt_s2ef:val_id --index 3 --steps 1000 --out runs/s2ef/nve_local_s0.json
    "$PY" -c "import json, sys; from flt_mol.calculator import FLTCalculator, translation_sensitivity; \
from flt_mol.relax import read_structures; atoms = read_structures('emt_s2ef:val_id', limit=50)[1]; \
print(json.dumps(translation_sensitivity(FLTCalculator(sys.argv[1]), atoms, shifts=8, seed=0)))" "$ckpt"
    "$PY" -m flt_mol.bench.forces --sizes 3 4 6 8 11 16 --max-exact-atoms 70 --repeats 2 --out runs/s2ef/bench_local.json
    "$PY" -m flt_mol.bench.forces --context features --modes flt --sizes 3 4 6 8 11 16 --repeats 2 \
      --out runs/s2ef/bench_features.json
    ;;
  crossover)
    "$PY" -m flt_mol.train.crossover --recipe recipes/emt_is2re_flt.yaml \
      --tokens 64 128 256 512 1024 2048 --out runs/is2re_crossover.json
    ;;
  lm)
    # 3 seeds per recipe, seed-major so that a cut-short run still compares every model; the
    # recipes differ only in the attention (1,000 steps, fixed random features). Times per run:
    # runs/lm/<model>/seed<k>/time.txt (wall, user, system s). Table: scripts/lm_table.py.
    for seed in ${LM_SEEDS:-0 1 2}; do
      for m in ${LM_MODELS:-flt_local flt_gm performer loglinear linear cosformer exact}; do
        out=runs/lm/$m/seed$seed
        [ -f "$out/metrics.json" ] && continue
        mkdir -p "$out"
        /usr/bin/time -f "%e %U %S" -o "$out/time.txt" \
          "$FLT" train recipes/lm_$m.yaml --out "$out" run.seed=$seed run.progress=false
      done
    done
    "$PY" scripts/lm_table.py runs/lm
    ;;
  vit)
    for m in flt performer cosformer; do
      "$FLT" train recipes/vit_$m.yaml --out runs/vit_$m
    done
    ;;
  bench)
    mkdir -p runs/bench
    "$FLT" bench attention --lengths 512 1024 2048 4096 8192 --batch 2 \
      --methods flt performer exact loglinear cosformer performer_pytorch \
      --out runs/bench/attention.json --plot runs/bench/attention.png
    "$FLT" bench rpe --lengths 128 1024 8192 --out runs/bench/rpe.json --plot runs/bench/rpe.png
    "$FLT" bench data --out runs/bench/data.json
    ;;
  viz)
    "$FLT" viz attention-maps runs/lm/flt_local/seed0/best.pt --out runs/viz/lm_flt_local
    "$FLT" viz attention-maps runs/lm/flt_gm/seed0/best.pt --out runs/viz/lm_flt_gm
    "$FLT" viz local-rpe --out runs/viz/local_rpe
    "$FLT" viz local-rpe --checkpoint runs/lm/flt_local/seed0/best.pt --out runs/viz/local_rpe_learned
    ;;
  optim)
    # Equal meta-training budget for every memory (400 x 4 tasks x 20 unrolled steps).
    for r in flt_local flt_gm performer lstm swarm_flt swarm_performer; do
      "$FLT" optim meta-train recipes/optim_$r.yaml --out runs/optim/$r
    done
    "$FLT" optim evaluate --checkpoint flt_local=runs/optim/flt_local/checkpoint.pt \
      --checkpoint flt_gm=runs/optim/flt_gm/checkpoint.pt \
      --checkpoint performer=runs/optim/performer/checkpoint.pt \
      --checkpoint lstm=runs/optim/lstm/checkpoint.pt \
      --dims 2 5 10 --num-functions 16 --digits-steps 300 --out runs/optim/eval
    "$FLT" optim evaluate --checkpoint swarm_flt=runs/optim/swarm_flt/checkpoint.pt \
      --checkpoint swarm_performer=runs/optim/swarm_performer/checkpoint.pt \
      --num-functions 16 --digits-steps 0 --out runs/optim/eval_swarm
    ;;
  optim-long)
    # The same budget in 50-step truncations (160 x 4 x 50): less short-horizon bias.
    for r in flt_local flt_gm performer lstm; do
      "$FLT" optim meta-train recipes/optim_$r.yaml unroll_length=50 meta_iterations=160 --out runs/optim/long/$r
    done
    "$FLT" optim evaluate --checkpoint flt_local=runs/optim/long/flt_local/checkpoint.pt \
      --checkpoint flt_gm=runs/optim/long/flt_gm/checkpoint.pt \
      --checkpoint performer=runs/optim/long/performer/checkpoint.pt \
      --checkpoint lstm=runs/optim/long/lstm/checkpoint.pt \
      --dims 2 5 10 --num-functions 16 --digits-steps 300 --out runs/optim/long/eval
    ;;
  *)
    echo "unknown section '$section'" >&2
    exit 2
    ;;
esac
