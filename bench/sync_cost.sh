#!/usr/bin/env bash
# Where a sync step's extra time went, from the Horovod path to the mesh: LeNet's hybridized
# training step at 2 workers, SyncBatchNorm against Gluon's BN (bench/step_time.py, the two
# interleaved within each job), under each setting that changed, REPEAT times over.
#
#   bench/sync_cost.sh [OUT_JSON] [REPEAT] [ROUNDS]     # defaults: stdout only, 2, 9
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${DISTBN_VENV:-$here/.venv}/bin/python
out=${1:-}; repeat=${2:-2}; rounds=${3:-9}
settings=(
  "before: Horovod transport, 0.1 ms cycle, unpinned|DISTBN_MESH=0 HOROVOD_CYCLE_TIME=0.1 DISTBN_PIN=0"
  "mesh, 0.1 ms cycle, unpinned|HOROVOD_CYCLE_TIME=0.1 DISTBN_PIN=0"
  "mesh, 5 ms cycle, unpinned|HOROVOD_CYCLE_TIME=5 DISTBN_PIN=0"
  "after: mesh, 5 ms cycle, pinned (the defaults)|HOROVOD_CYCLE_TIME=5"
)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cd "$here"
for r in $(seq "$repeat"); do
  for i in "${!settings[@]}"; do
    label=${settings[$i]%%|*}; vars=${settings[$i]#*|}
    (export DISTBN_LOCAL_WORKERS=2; . launch/env.sh; export OMP_NUM_THREADS=1 $vars
     timeout 900 "$(dirname "$py")/horovodrun" -np 2 -H localhost:2 "$py" -W ignore \
       bench/step_time.py --arch lenet --rounds "$rounds" --steps 10 --json "$tmp/$i-$r.json" \
       > /dev/null)
    "$py" - "$tmp/$i-$r.json" "$label" <<'PY'
import json, sys
row = json.load(open(sys.argv[1]))["rows"][0]
print(f"{sys.argv[2]}: gluon {row['gluon_ms']} ms, sync {row['sync_ms']} ms, "
      f"sync/gluon {row['sync_vs_gluon']} (round median {row['sync_vs_gluon_round_median']})"
      + (f"; in mesh collectives {row['sync_mesh_ms']} ms/step, waiting {row['sync_mesh_wait_ms']}"
         if "sync_mesh_ms" in row else ""))
PY
  done
done
if [ -n "$out" ]; then
  "$py" - "$tmp" "$out" "${settings[@]}" <<'PY'
import json, pathlib, sys
tmp, out, labels = pathlib.Path(sys.argv[1]), sys.argv[2], [s.split("|")[0] for s in sys.argv[3:]]
runs = [{"setting": labels[int(p.stem.split("-")[0])], "env": sys.argv[3 + int(p.stem.split("-")[0])].split("|")[1],
         **json.load(open(p))["rows"][0]} for p in sorted(tmp.glob("*.json"))]
json.dump({"runs": runs}, open(out, "w"), indent=1)
PY
fi
