#!/usr/bin/env bash
# The GPU checks, as one script for the lent GPU machine (run from the repository root; outputs in $OUT).
# That machine has jax/flax/optax/orbax but no ml_collections (carried in .gpu_vendor/) and no network
# (Fashion-MNIST carried in .gpu_data/). Sections are time-boxed so that each returns what it finished;
# a section whose budget is 0 is skipped. Throughput rows are written as each clients-per-round value finishes.
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/.gpu_vendor" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
python -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/device.txt" 2>&1

throughput() {  # budget_s output_name flags...
  local budget=$1 name=$2
  shift 2
  [ "$budget" -gt 0 ] && timeout "$budget" python -m benchmarks.throughput "$@" > "$OUT/$name.md" 2> "$OUT/$name.err"
}
# Issue 6: client-phase throughput of every strategy (the CNN with the default convolution, im2col, first, then
# FedSND's round time), the CNN with XLA's convolution, then the MLP.
throughput "${CNN_S:-240}" throughput_cnn2 --models=cnn2 --clients=10,100,1000 --strategies=vmap,chunked,loop \
  --max_loop_clients=100 --max_bound_batch=32000
throughput "${XLA_CONV_S:-90}" throughput_cnn2_xla --models=cnn2 --conv_impl=xla --clients=100,1000 \
  --strategies=vmap,chunked,loop --max_loop_clients=100 --round_table=false
throughput "${MLP_S:-90}" throughput_mlp --models=mlp --clients=10,100,1000 --strategies=vmap,chunked,loop \
  --round_table=false

# Issues 4/5: full Fashion-MNIST, 10 clients all participating, α = 0.1 then 0.5; validation split kept.
if [ "${SWEEP_S:-170}" -gt 0 ]; then
  for alpha in ${ALPHAS:-0.1 0.5}; do
    timeout "${SWEEP_S:-170}" python -m experiments.sweep --config=benchmarks/configs/fmnist_gpu.py \
      --config.dataset=idx:.gpu_data/fashion-mnist --alphas=$alpha --seeds=0 \
      --flagfile=benchmarks/fmnist_algorithms.flags ${ALGORITHMS:+--algorithms=$ALGORITHMS} \
      --workdir="$OUT/fmnist_full" > "$OUT/sweep_alpha_$alpha.log" 2>&1
  done
  find "$OUT/fmnist_full" -name checkpoints -type d -prune -exec rm -rf {} +
  find "$OUT/fmnist_full" -name tensorboard -type d -prune -exec rm -rf {} +
  # The device tool returns no file whose name holds "=" (the sweep's cell folders): pack them.
  tar czf "$OUT/fmnist_full.tgz" -C "$OUT" fmnist_full && rm -rf "$OUT/fmnist_full"
fi

# Issue 15: whole sweeps as one program. Cells per minute, cell by cell and then --vectorize=seeds,alphas, on
# full Fashion-MNIST (fmnist_gpu.py), α ∈ {0.1, 0.5, 1.0} × seeds 0–2 (VEC_ALGORITHMS, default fedavg); off
# unless VEC_S > 0 (each mode's time budget). vectorize.txt: mode, exit code, seconds, finished cells.
if [ "${VEC_S:-0}" -gt 0 ]; then
  for mode in sequential vectorized; do
    flag=""
    [ "$mode" = vectorized ] && flag="--vectorize=seeds,alphas"
    start=$(date +%s)
    timeout "$VEC_S" python -m experiments.sweep --config=benchmarks/configs/fmnist_gpu.py \
      --config.dataset=idx:.gpu_data/fashion-mnist --algorithms="${VEC_ALGORITHMS:-fedavg}" --alphas=0.1,0.5,1.0 \
      --seeds=0,1,2 --workdir="$OUT/vec_$mode" $flag > "$OUT/vectorize_$mode.log" 2>&1
    rc=$?
    echo "$mode rc=$rc seconds=$(( $(date +%s) - start )) cells=$(find "$OUT/vec_$mode" -name summary.json | wc -l)" \
      >> "$OUT/vectorize.txt"
    cp "$OUT/vec_$mode/results.md" "$OUT/vectorize_$mode.md" 2>/dev/null
    rm -rf "$OUT/vec_$mode"
  done
fi
