#!/usr/bin/env bash
# The leaderboard (issue 13): every algorithm at its tuned setting × {10 clients all participating, 100 clients
# 10 per round} × α ∈ {0.1, 0.5} on real Fashion-MNIST, evaluation seeds 0–2, tables into benchmarks/RESULTS.md.
# Needs `apt-get install -y dataset-fashion-mnist`; run `python -m benchmarks.tuning` first for tuned settings
# (untuned algorithms run at their papers' defaults, and the table says so). The settings are the reduced CPU
# protocols of benchmarks/configs/fmnist_cpu.py and fmnist_cpu_xdevice.py (5,000 / 9,000 training examples, 12 /
# 20 rounds): about 6 hours on 2 CPU cores, most of it FedSND's server. Finished runs are skipped, so rerunning
# resumes; pass e.g. --settings=xdevice_a0.1 to run one setting.
set -eu
python -m benchmarks.leaderboard --results=benchmarks/RESULTS.md "$@"
