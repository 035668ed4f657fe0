#!/usr/bin/env bash
# One command from a fresh clone: set up, then compare Local, FedAvg and FedAvg-FT on MNIST
# (Dirichlet alpha = 0.1, 20 clients), print the table and write plots under runs/quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
OUT=runs/quickstart
if [ -e "$OUT" ]; then
  OUT="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
fi
start=$(date +%s)
.venv/bin/fedpal compare configs/quickstart.toml --algorithms local,fedavg,fedavg_ft --seeds 0 --out "$OUT"
echo "quickstart: $(( $(date +%s) - start )) s; plot: $OUT/accuracy_vs_round.png"
