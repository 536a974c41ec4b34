#!/usr/bin/env bash
# The accelerator benchmark: the train step of celeba_l4 (its real batch, 128) in float32 and
# bfloat16, with and without per-level rematerialisation, and the quickstart; each compared with
# the device's matmul rate in the same dtype (8192^3, median of 20). Run from the repository root
# on a machine with a GPU/TPU and jax, flax, optax, orbax-checkpoint, ml-collections and grain:
#
#   bash benchmarks/accelerator.sh [OUTDIR]   (PYTHON=.venv/bin/python, HVAE_BENCH_LIMIT=seconds
#   per configuration, HVAE_BENCH_MATMUL=n of the reference matmul, if not the defaults)
#
# Each configuration runs in its own process with a time limit, so one failure (out of memory,
# a missing package) does not stop the others; tables and logs go to OUTDIR (default
# /tmp/hvae_accelerator). Results: BENCHMARKS.md, "Accelerator".
set -u
out=${1:-/tmp/hvae_accelerator}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
limit=${HVAE_BENCH_LIMIT:-150}
(nvidia-smi -L 2>/dev/null; ${PYTHON:-python3} -c "import jax, flax, optax; print('jax', jax.__version__,
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())") 2>&1 | tee "$out/env.txt"
run() {  # name, then benchmark flags
  local name=$1; shift
  echo "== $name: $*" | tee "$out/$name.txt"
  timeout "$limit" ${PYTHON:-python3} -m benchmarks.train_step --matmul_size=${HVAE_BENCH_MATMUL:-8192} "$@" \
    >>"$out/$name.txt" 2>"$out/$name.err"
  echo "rc=$?" >>"$out/$name.txt"
  grep -E "^\|" "$out/$name.txt" | grep -E "images/s|achieved|compile|peak memory|XLA memory|median step|matmul FLOP|FLOPs per step" || tail -5 "$out/$name.err"
}
run celeba_fp32 --config=experiments/celeba_l4.py --eval_estimate=true
run celeba_bf16 --config=experiments/celeba_l4.py --config.model.compute_dtype=bfloat16 \
  --matmul_dtype=bfloat16 --eval_estimate=false
run celeba_bf16_remat --config=experiments/celeba_l4.py --config.model.compute_dtype=bfloat16 \
  --config.model.remat='(True,)' --matmul_dtype=bfloat16 --eval_estimate=false
run celeba_bf16_b512 --config=experiments/celeba_l4.py --config.model.compute_dtype=bfloat16 \
  --batch_size=512 --matmul_dtype=bfloat16 --eval_estimate=false
run quickstart_fp32 --config=experiments/quickstart.py --eval_estimate=true
run quickstart_bf16 --config=experiments/quickstart.py --config.model.compute_dtype=bfloat16 \
  --matmul_dtype=bfloat16 --eval_estimate=false
