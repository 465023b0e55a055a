#!/usr/bin/env bash
# Accelerator checks as one script: client-phase throughput of every client-mapping strategy, FedSND's round time
# beside FedAvg's, FedSND against FedAvg on full Fashion-MNIST, and (optionally) whole sweeps as one program.
# Run from the repository root:
#
#   benchmarks/gpu_checks.sh [--out=DIR] [--fmnist=DIR] [--pythonpath=PATHS] [--pack]
#                            [--cnn_s=S] [--xla_conv_s=S] [--mlp_s=S] [--sweep_s=S] [--vec_s=S]
#
# Every option can also be set by the environment variable in brackets; an option given wins.
#   --out=DIR           [OUT]               output folder (default runs/gpu)
#   --fmnist=DIR        [FMNIST_DIR]        Fashion-MNIST as IDX files (default /usr/share/datasets/fashion-mnist,
#                                           where Debian's dataset-fashion-mnist puts them)
#   --pythonpath=PATHS  [EXTRA_PYTHONPATH]  put on PYTHONPATH after the repository: e.g. a folder of packages the
#                                           machine's Python lacks (ml_collections) where pip cannot reach them
#   --pack              [PACK=1]            replace each sweep folder by <name>.tgz, without checkpoints and
#                                           TensorBoard files: one file to copy back (the cell folders' names
#                                           hold "=", which some copy tools refuse)
# Each section is time-boxed (seconds; 0 skips it), so it leaves behind what it finished:
#   --cnn_s=S           [CNN_S=240]         throughput, the CNN with the default convolution, then FedSND's round
#   --xla_conv_s=S      [XLA_CONV_S=90]     throughput, the CNN with XLA's convolution
#   --mlp_s=S           [MLP_S=90]          throughput, the MLP
#   --sweep_s=S         [SWEEP_S=170]       full Fashion-MNIST, 10 clients all participating, one seed: each α of
#                                           ALPHAS (default "0.1 0.5") gets S; ALGORITHMS (comma-separated)
#                                           replaces its algorithms (fedavg, fedsd, fednd, fedsnd and
#                                           fedsnd_cw_first3, FedSND's best variant on the reduced protocol)
#   --vec_s=S           [VEC_S=0]           whole sweeps as one program: cells per minute cell by cell, then with
#                                           --vectorize=seeds,alphas (α ∈ {0.1, 0.5, 1.0} × seeds 0–2 of
#                                           VEC_ALGORITHMS, default fedavg); each mode gets S
#
# Outputs in the output folder: device.txt (the accelerator and jax); RESULTS.md, one block per throughput section
# (benchmarks/results.py), with throughput_*.md / .err as printed; sweep_alpha_<α>.log and fmnist_full/ (the
# sweep's cells and results.md); vectorize.txt (mode, exit code, seconds, finished cells), vectorize_<mode>.log
# and .md.
set -u

usage() { awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; }

while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --pack) PACK=1; shift; continue ;;
    --*=*) name=${1%%=*} value=${1#*=} ;;
    --*) name=$1 value=${2-}; [ $# -ge 2 ] || { echo "$name needs a value" >&2; exit 2; }; shift ;;
    *) echo "unexpected argument: $1 (see $0 --help)" >&2; exit 2 ;;
  esac
  shift
  case $name in
    --out) OUT=$value ;;
    --fmnist) FMNIST_DIR=$value ;;
    --pythonpath) EXTRA_PYTHONPATH=$value ;;
    --cnn_s) CNN_S=$value ;;
    --xla_conv_s) XLA_CONV_S=$value ;;
    --mlp_s) MLP_S=$value ;;
    --sweep_s) SWEEP_S=$value ;;
    --vec_s) VEC_S=$value ;;
    *) echo "unknown option: $name (see $0 --help)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-runs/gpu}
FMNIST_DIR=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
PACK=${PACK:-0}
CNN_S=${CNN_S:-240} XLA_CONV_S=${XLA_CONV_S:-90} MLP_S=${MLP_S:-90} SWEEP_S=${SWEEP_S:-170} VEC_S=${VEC_S:-0}
for budget in "$CNN_S" "$XLA_CONV_S" "$MLP_S" "$SWEEP_S" "$VEC_S"; do
  case $budget in '' | *[!0-9]*) echo "a time budget must be whole seconds, got '$budget'" >&2; exit 2 ;; esac
done

mkdir -p "$OUT"
export PYTHONPATH="$PWD${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: > "$OUT/device.txt"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/device.txt" 2>&1
fi
python -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/device.txt" 2>&1

pack() {  # folder name under $OUT
  [ "$PACK" = 1 ] && [ -d "$OUT/$1" ] || return 0
  find "$OUT/$1" \( -name checkpoints -o -name tensorboard \) -type d -prune -exec rm -rf {} +
  tar czf "$OUT/$1.tgz" -C "$OUT" "$1" && rm -rf "$OUT/$1"
}

throughput() {  # budget_s output_name flags...; the table also goes to its own block of $OUT/RESULTS.md
  local budget=$1 name=$2
  shift 2
  [ "$budget" -gt 0 ] || return 0
  timeout "$budget" python -m benchmarks.throughput "$@" --results="$OUT/RESULTS.md" --block="$name" \
    > "$OUT/$name.md" 2> "$OUT/$name.err"
}
# Client-phase throughput of every strategy: the CNN with the default convolution (im2col) first, then FedSND's
# round time; the CNN with XLA's convolution; the MLP. Rows are written as each clients-per-round value finishes.
throughput "$CNN_S" throughput_cnn2 --models=cnn2 --clients=10,100,1000 --strategies=vmap,chunked,loop \
  --max_loop_clients=100 --max_bound_batch=32000
throughput "$XLA_CONV_S" throughput_cnn2_xla --models=cnn2 --conv_impl=xla --clients=100,1000 \
  --strategies=vmap,chunked,loop --max_loop_clients=100 --round_table=false
throughput "$MLP_S" throughput_mlp --models=mlp --clients=10,100,1000 --strategies=vmap,chunked,loop \
  --round_table=false

if [ "$SWEEP_S" -gt 0 ] || [ "$VEC_S" -gt 0 ]; then
  [ -d "$FMNIST_DIR" ] || { echo "no Fashion-MNIST in $FMNIST_DIR (--fmnist): sweeps skipped" >&2; exit 1; }
fi

# Full Fashion-MNIST (benchmarks/configs/fmnist_gpu.py), 10 clients all participating, each α, validation split
# kept: FedAvg, FedSD (client side only), FedND (server side only), FedSND, and FedSND with class-count teachers
# and distillation in the first 3 rounds only (the best variant on the reduced CPU protocol's validation split,
# benchmarks/configs/fmnist_cpu.py).
if [ "$SWEEP_S" -gt 0 ]; then
  best=fedsnd_cw_first3:algorithm=fedsnd:fedsnd.distillation.teacher_weighting=class_count
  best+=:fedsnd.schedule.distill_rounds=3
  for alpha in ${ALPHAS:-0.1 0.5}; do
    timeout "$SWEEP_S" python -m experiments.sweep --config=benchmarks/configs/fmnist_gpu.py \
      --config.dataset="idx:$FMNIST_DIR" --alphas="$alpha" --seeds=0 \
      --algorithms="${ALGORITHMS:-fedavg,fedsd,fednd,fedsnd,fedsnd_cw_first3}" \
      --variant="$best" \
      --workdir="$OUT/fmnist_full" > "$OUT/sweep_alpha_$alpha.log" 2>&1
  done
  pack fmnist_full
fi

# Whole sweeps as one program: cells per minute, cell by cell and then vectorised over seeds and α.
if [ "$VEC_S" -gt 0 ]; then
  for mode in sequential vectorized; do
    flag=""
    [ "$mode" = vectorized ] && flag="--vectorize=seeds,alphas"
    start=$(date +%s)
    timeout "$VEC_S" python -m experiments.sweep --config=benchmarks/configs/fmnist_gpu.py \
      --config.dataset="idx:$FMNIST_DIR" --algorithms="${VEC_ALGORITHMS:-fedavg}" --alphas=0.1,0.5,1.0 \
      --seeds=0,1,2 --workdir="$OUT/vec_$mode" $flag > "$OUT/vectorize_$mode.log" 2>&1
    rc=$?
    echo "$mode rc=$rc seconds=$(( $(date +%s) - start )) cells=$(find "$OUT/vec_$mode" -name summary.json | wc -l)" \
      >> "$OUT/vectorize.txt"
    cp "$OUT/vec_$mode/results.md" "$OUT/vectorize_$mode.md" 2>/dev/null
    rm -rf "$OUT/vec_$mode"
  done
fi
