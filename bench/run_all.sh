#!/usr/bin/env bash
# Every benchmark of docs/results.md, one after another, JSON + PNG into one folder.
#
#   bench/run_all.sh [OUT]            # the full set (~50 min on 2 cores); OUT defaults to docs
#   bench/run_all.sh --quick [OUT]    # reduced settings (~3 min); OUT defaults to runs/bench-quick
#
# Needs the bench and book extras (matplotlib, d2l): `make bench` / `make bench-quick` install
# them first. JSON goes to OUT/data, PNG to OUT/img; each script's table goes to stdout.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${DISTBN_VENV:-$here/.venv}/bin/python
quick=0
if [ "${1:-}" = --quick ]; then quick=1; shift; fi
out=${1:-$( [ $quick = 1 ] && echo "$here/runs/bench-quick" || echo "$here/docs" )}
mkdir -p "$out/data" "$out/img"
"$py" -c 'import d2l, matplotlib' 2>/dev/null ||
  { echo "bench/run_all.sh: needs the bench and book extras: make bench (or DISTBN_EXTRAS=dev,bench,book launch/install.sh)" >&2; exit 2; }
# The data, before any benchmark runs (DISTBN_DATA_DIR, the cache, Debian's copy, download).
"$py" -W ignore -c 'from distbn.data import load_fashion_mnist as f; f(train=True); f(train=False)' ||
  { echo "bench/run_all.sh: no Fashion-MNIST (see the message above)" >&2; exit 2; }

workers() {  # workers N COMMAND...: run with launch/env.sh's settings for N local workers
  (export DISTBN_LOCAL_WORKERS=$1; shift; . "$here/launch/env.sh"; exec "$@")
}
# Nothing here exports thread settings: the training benchmarks go through launch/local.sh,
# which sets them per worker count; an inherited OMP_NUM_THREADS=2 given to each of 2 workers
# on 2 cores made training 3.7-5.2x slower here.

step() {  # step NAME COMMAND...: run, time, and stop the whole set on a failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@"
  echo "== $name: $((SECONDS - t0)) s"
}

if [ $quick = 1 ]; then
  layer=(--batch 64 --repeat 10 --rounds 2)
  thru=(--workers 1 2 --limit 5120 --repeat 1)
  acc=(--quick)
  groups=(--quick)
  precise=(--workers 2 --seeds 0 --epochs 2 --limit 5120 --precise-bn 2048)
  bytes_steps=50
  book=(--quick)
  coll=(--repeat 10)
  phases=(--steps 20)
  steps=(--rounds 3 --steps 5)
else
  layer=(--batch 64 256 --repeat 30)
  thru=(--workers 1 2 4 --repeat 3)
  acc=()
  groups=(--batch 4 --seeds 0 1 2 3)
  precise=(--workers 1 2 4 --seeds 0 1 2 --epochs 5 --precise-bn 10240)
  bytes_steps=200
  book=(--epochs 5)
  coll=(--repeat 40)
  phases=(--steps 50)
  steps=(--rounds 9 --steps 10)
fi

cd "$here"
step layer workers 1 "$py" bench/layer.py "${layer[@]}" --json "$out/data/layer.json"
step collective workers 2 timeout 900 "$(dirname "$py")/horovodrun" -np 2 -H localhost:2 \
  "$py" bench/collective.py "${coll[@]}" --json "$out/data/collective.json"
for n in 1 2; do
  if [ "$n" = 1 ]; then launcher=(); else launcher=(timeout 900 "$(dirname "$py")/horovodrun" -np "$n" -H "localhost:$n"); fi
  step "step_phases x$n" workers "$n" "${launcher[@]}" "$py" bench/step_phases.py "${phases[@]}" \
    --json "$out/data/step_phases_$n.json"
done
for n in 1 2 4; do
  if [ "$n" = 1 ]; then launcher=(); else launcher=(timeout 1800 "$(dirname "$py")/horovodrun" -np "$n" -H "localhost:$n"); fi
  step "step_time x$n" workers "$n" "${launcher[@]}" "$py" bench/step_time.py "${steps[@]}" \
    --json "$out/data/step_time_$n.json"
done
for n in 1 2; do
  if [ "$n" = 1 ]; then launcher=(); else launcher=(timeout 1800 "$(dirname "$py")/horovodrun" -np "$n" -H "localhost:$n"); fi
  step "numpy_mode x$n" workers "$n" "${launcher[@]}" "$py" bench/numpy_mode.py --arch lenet resnet18_v1 \
    "${steps[@]}" --json "$out/data/numpy_mode_$n.json"
  step "precision x$n" workers "$n" "${launcher[@]}" "$py" bench/precision.py "${steps[@]}" \
    --json "$out/data/precision_$n.json"
done
step throughput "$py" bench/throughput.py "${thru[@]}" --json "$out/data/throughput.json" \
  --plot "$out/img/throughput.png"
step book_path "$py" bench/book_path.py "${book[@]}" --json "$out/data/book_path.json"
step accuracy_vs_batch "$py" bench/accuracy_vs_batch.py "${acc[@]}" \
  --json "$out/data/accuracy_vs_batch.json" --plot "$out/img/accuracy_vs_batch.png"
step bn_group "$py" bench/bn_group.py "${groups[@]}" --json "$out/data/bn_group.json"
step precise_bn "$py" bench/precise_bn.py "${precise[@]}" --json "$out/data/precise_bn.json" \
  --plot "$out/img/precise_bn.png"
step sync_bytes_model "$py" bench/sync_bytes.py --model --json "$out/data/sync_bytes_model.json"
if unshare -n true 2>/dev/null; then  # loopback bytes need a network namespace of their own
  for n in 2 4 8; do
    step "sync_bytes x$n" workers "$n" unshare -n bash -c 'ip link set lo up && HOROVOD_CYCLE_TIME=1000 exec "$@"' _ \
      timeout 900 "$(dirname "$py")/horovodrun" -np "$n" -H "localhost:$n" "$py" bench/sync_bytes.py \
      --steps "$bytes_steps" --json "$out/data/sync_bytes_$n.json"
  done
else
  echo "== sync_bytes: skipped, no network namespace (unshare -n needs root)"
fi
echo "== all benchmarks done in $SECONDS s; results in $out/data and $out/img"
