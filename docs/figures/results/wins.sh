#!/usr/bin/env bash
# Issue 21, "Where SOAP wins" (docs/results.md): every command of the study, in the order run.
#   bash docs/figures/results/wins.sh reports   # rebuild the combined reports from the
#                                               # committed folders (trains nothing, seconds)
#   bash docs/figures/results/wins.sh all       # train everything again: about 10 CPU-hours
# Run from the repository root with soaplab installed (make setup; .venv/bin on PATH). The
# training commands refuse a folder that already holds runs (add --overwrite to redo one).
set -euo pipefail
R=docs/figures/results
# AdamW's recipe for every optimizer, evaluations every 10 steps, float32 Newton-Schulz
F="--beta1s 0.9 --weight-decays 0.1 --eval-every 10 --ns-dtype float32 --threads 1"
B128="--batch-size 128 --steps 300 --warmup 5"  # the batch axis: batch 128 at fixed tokens

grids() {  # seed 0; one folder per optimizer (or setting), each run its own process
  soaplab compare lm --optimizers adamw --lrs 0.002,0.004,0.008 $F --out $R/wins-lr-adamw
  soaplab compare lm --optimizers adamw --lrs 0.001 $F --out $R/wins-lr-adamw-low
  soaplab compare lm --optimizers muon --lrs 0.008,0.004,0.016 $F --out $R/wins-lr-muon
  soaplab compare lm --optimizers muon --lrs 0.002 $F --out $R/wins-lr-muon-low
  soaplab compare lm --optimizers normuon --lrs 0.008,0.004,0.016 --momenta 0.9 $F \
      --out $R/wins-lr-normuon
  soaplab compare lm --optimizers normuon --lrs 0.002 --momenta 0.9 $F --out $R/wins-lr-normuon-low
  soaplab compare lm --optimizers soap --lrs 0.004,0.008,0.016,0.032,0.064 --beta1s 0.9 \
      --weight-decays 0.1 --threads 1 --out $R/migrate-lm-recipe-soap  # evaluations every 25
  soaplab compare lm --optimizers soap_hidden --lrs 0.002,0.004,0.008,0.016 $F \
      --out $R/wins-lr-soap_hidden
  soaplab compare lm --optimizers soap_muon --lrs 0.002,0.004,0.008,0.016 --momenta 0.9 $F \
      --out $R/wins-lr-soap_muon
  soaplab compare lm --optimizers shampoo --lrs 0.0025,0.005,0.01,0.02 $F --out $R/wins-lr-shampoo
  soaplab compare lm --optimizers kl_shampoo --lrs 0.0025,0.005,0.01,0.02 $F \
      --out $R/wins-grid-kl_shampoo
  soaplab compare lm --optimizers kl_shampoo --lrs 0.00125 $F --out $R/wins-lr-kl_shampoo-low
}

settings() {  # momentum (Muon-type) or beta2 (Adam-type) at the best two lrs, seed 0
  soaplab compare lm --optimizers muon --lrs 0.008 --momenta 0.9 $F --out $R/wins-mom-muon
  soaplab compare lm --optimizers muon --lrs 0.016 --momenta 0.9 $F --out $R/wins-mom-muon-b
  soaplab compare lm --optimizers normuon --lrs 0.008,0.004 --momenta 0.95 $F \
      --out $R/wins-mom-normuon
  soaplab compare lm --optimizers soap_muon --lrs 0.004,0.008 --momenta 0.95 $F \
      --out $R/wins-mom-soap_muon
  soaplab compare lm --optimizers soap --lrs 0.008,0.004 --beta2s 0.99 $F --out $R/wins-beta2-soap
  soaplab compare lm --optimizers soap_hidden --lrs 0.004 --beta2s 0.99 $F \
      --out $R/wins-beta2-soap_hidden
  soaplab compare lm --optimizers soap_hidden --lrs 0.008 --beta2s 0.99 $F \
      --out $R/wins-beta2-soap_hidden-b
}

seeds() {  # at the chosen settings
  soaplab compare lm --optimizers adamw --lrs 0.004 --seeds 1,2,3,4 $F --out $R/wins-seeds-adamw
  soaplab compare lm --optimizers muon --lrs 0.008 --seeds 1,2,3,4 $F --out $R/wins-seeds-muon
  soaplab compare lm --optimizers muon --lrs 0.008 --momenta 0.9 --seeds 1,2 $F \
      --out $R/wins-seeds-muon-mom-a
  soaplab compare lm --optimizers muon --lrs 0.008 --momenta 0.9 --seeds 3,4 $F \
      --out $R/wins-seeds-muon-mom-b
  soaplab compare lm --optimizers normuon --lrs 0.008 --momenta 0.9 --seeds 1,2 $F \
      --out $R/wins-seeds-normuon-a
  soaplab compare lm --optimizers normuon --lrs 0.008 --momenta 0.9 --seeds 3,4 $F \
      --out $R/wins-seeds-normuon-b
  soaplab compare lm --optimizers soap --lrs 0.008 --seeds 0,1,2,3,4 $F --out $R/wins-seeds-soap
  soaplab compare lm --optimizers soap_hidden --lrs 0.004 --seeds 0,1,2,3,4 $F \
      --out $R/wins-seeds-soap_hidden
  soaplab compare lm --optimizers soap_muon --lrs 0.004 --momenta 0.9 --seeds 1,2 $F \
      --out $R/wins-seeds-soap_muon-a
  soaplab compare lm --optimizers soap_muon --lrs 0.004 --momenta 0.9 --seeds 3,4 $F \
      --out $R/wins-seeds-soap_muon-b
  soaplab compare lm --optimizers soap_muon --lrs 0.004 --momenta 0.95 --seeds 1,2 $F \
      --out $R/wins-seeds-soap_muon-mom-a
  soaplab compare lm --optimizers soap_muon --lrs 0.004 --momenta 0.95 --seeds 3,4 $F \
      --out $R/wins-seeds-soap_muon-mom-b
  soaplab compare lm --optimizers shampoo --lrs 0.01 --seeds 1,2 $F --out $R/wins-seeds-shampoo
  soaplab compare lm --optimizers kl_shampoo --lrs 0.0025 --seeds 1,2 $F \
      --out $R/wins-seeds-kl_shampoo
}

batch() {  # batch 128 at the default task's tokens (300 steps), lrs regridded, seed 0
  soaplab compare lm --optimizers muon --lrs 0.008,0.016,0.032 --momenta 0.9 $B128 $F \
      --out $R/batch128-muon
  soaplab compare lm --optimizers normuon --lrs 0.008,0.016,0.032 --momenta 0.9 $B128 $F \
      --out $R/batch128-normuon
  soaplab compare lm --optimizers soap_muon --lrs 0.004,0.008,0.016 --momenta 0.95 $B128 $F \
      --out $R/batch128-soap_muon
}

floor() {  # the whitening paper's regime at its overfitting floor: 25k characters, dropout 0.2
  local O="--dropout 0.2 --max-chars 25000 --ns-dtype float32 --threads 1"
  soaplab compare lm --optimizers adamw --lrs 0.004 $O --out $R/floor-adamw
  soaplab compare lm --optimizers muon --lrs 0.005 $O --out $R/floor-muon
  soaplab compare lm --optimizers soap --lrs 0.005 $O --out $R/floor-soap
}

reports() {  # the combined reports: every run reused from the folders above; --resume where a
  # report's folder is already there (it rewrites report.md and the plots, trains nothing)
  local reuse=() d
  for d in "$R"/wins-*; do reuse+=(--reuse "$d"); done
  again() { if [ -d "$1" ]; then echo --resume; fi; }
  soaplab compare lm --optimizers adamw,muon,normuon,soap,soap_hidden,soap_muon \
      --lr adamw=0.004 --lr muon=0.008 --lr normuon=0.008 --lr soap=0.008 \
      --lr soap_hidden=0.004 --lr soap_muon=0.004 --momenta 0.9 \
      --set soap_muon.momentum=0.95,0.9 --seeds 0,1,2,3,4 --against muon $F "${reuse[@]}" \
      $(again $R/wins) --out $R/wins
  soaplab compare lm --optimizers muon,normuon,soap_hidden,soap_muon --lr muon=0.008 \
      --lr normuon=0.008 --lr soap_hidden=0.004 --lr soap_muon=0.004 --momenta 0.9 \
      --set soap_muon.momentum=0.95,0.9 --seeds 0,1,2,3,4 --against normuon $F "${reuse[@]}" $(again $R/wins-vs-normuon) \
      --out $R/wins-vs-normuon
  soaplab compare lm --optimizers muon,soap_hidden --lr muon=0.008 --lr soap_hidden=0.004 \
      --seeds 0,1,2,3,4 --against muon $F "${reuse[@]}" $(again $R/wins-momentum0.95) \
      --out $R/wins-momentum0.95  # against Muon at torch's momentum, 0.95
  soaplab compare lm --optimizers muon,shampoo,kl_shampoo --lr muon=0.008 --lr shampoo=0.01 \
      --lr kl_shampoo=0.0025 --momenta 0.9 --seeds 0,1,2 --against muon $F "${reuse[@]}" \
      $(again $R/wins-3seeds) --out $R/wins-3seeds
  soaplab compare lm --optimizers muon,normuon,soap_muon --lr muon=0.016 --lr normuon=0.016 \
      --lr soap_muon=0.008 --momenta 0.9 --set soap_muon.momentum=0.95 --against muon $B128 $F \
      --reuse $R/batch128-muon --reuse $R/batch128-normuon --reuse $R/batch128-soap_muon \
      $(again $R/batch128) --out $R/batch128
  soaplab compare lm --optimizers adamw,muon,soap --lr adamw=0.004 --lr muon=0.005 \
      --lr soap=0.005 --dropout 0.2 --max-chars 25000 --ns-dtype float32 --threads 1 \
      --reuse $R/floor-adamw --reuse $R/floor-muon --reuse $R/floor-soap $(again $R/floor) \
      --out $R/floor
}

case "${1:-}" in
  reports) reports ;;
  all) grids; settings; seeds; batch; floor; reports ;;
  *) echo "usage: bash $0 reports|all" >&2; exit 2 ;;
esac
