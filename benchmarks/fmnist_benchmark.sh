#!/usr/bin/env bash
# The FedSND-vs-FedAvg benchmark on real Fashion-MNIST, reduced to fit 2 CPU cores (issue 5; RESULTS.md §4).
# Needs `apt-get install -y dataset-fashion-mnist`. Two settings, α ∈ {0.1, 0.5}, 3 seeds, the five algorithms of
# benchmarks/fmnist_algorithms.flags. Finished cells are skipped, so rerunning resumes; tables in
# runs/fmnist_cpu_grid/results.md and runs/fmnist_xdevice/results.md.
set -eu
ALGORITHMS=--flagfile=benchmarks/fmnist_algorithms.flags
# NIID-Bench protocol: 10 clients, all participating (4,500 training examples, 12 rounds).
python -m experiments.sweep --config=benchmarks/configs/fmnist_cpu.py $ALGORITHMS \
  --alphas=0.1,0.5 --seeds=0,1,2 --workdir=runs/fmnist_cpu_grid
# Cross-device: 100 clients, 10 per round (9,000 training examples, 20 rounds).
python -m experiments.sweep --config=benchmarks/configs/fmnist_cpu_xdevice.py $ALGORITHMS \
  --alphas=0.1,0.5 --seeds=0,1,2 --workdir=runs/fmnist_xdevice
