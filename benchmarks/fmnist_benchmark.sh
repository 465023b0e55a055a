#!/usr/bin/env bash
# The FedSND-vs-FedAvg benchmark on real Fashion-MNIST, reduced to fit 2 CPU cores (issue 5; RESULTS.md §4).
# Needs `apt-get install -y dataset-fashion-mnist`. Two settings, α ∈ {0.1, 0.5}, 3 seeds, five algorithms:
# FedAvg, FedSD, FedND, FedSND and the best FedSND variant on the validation split (class-count teachers,
# distillation in the first 3 rounds). Finished cells are skipped, so rerunning resumes; tables in
# runs/fmnist_cpu_grid/results.md and runs/fmnist_xdevice/results.md.
set -eu
BEST="--variant=fedsnd_cw_first3:algorithm=fedsnd:teacher_weighting=class_count:distill_rounds=3"
ALGORITHMS=fedavg,fedsd,fednd,fedsnd,fedsnd_cw_first3
# NIID-Bench protocol: 10 clients, all participating (4,500 training examples, 12 rounds).
python -m experiments.sweep --config=benchmarks/configs/fmnist_cpu.py "$BEST" --algorithms=$ALGORITHMS \
  --alphas=0.1,0.5 --seeds=0,1,2 --workdir=runs/fmnist_cpu_grid
# Cross-device: 100 clients, 10 per round (9,000 training examples, 20 rounds).
python -m experiments.sweep --config=benchmarks/configs/fmnist_cpu_xdevice.py "$BEST" --algorithms=$ALGORITHMS \
  --alphas=0.1,0.5 --seeds=0,1,2 --workdir=runs/fmnist_xdevice
