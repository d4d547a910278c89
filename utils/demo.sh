#!/usr/bin/env bash
# The demo behind `make demo`: mock survey -> pack (MPI ranks when mpirun is
# here) -> read the shards back -> MoCo v2 pretraining on CPU -> photo-z and
# morphology from the encoder -> similarity search, printing a summary of each stage.
#   utils/demo.sh VENV_BIN OUT_DIR N_GALAXIES
set -euo pipefail
BIN=${1:-.venv/bin}
OUT=${2:-demo_out}
N=${3:-300}
mkdir -p "$OUT"

echo "== 1/6 mock survey: $N SDSS galaxies (ugriz, 107x107) -> $OUT/mock"
if command -v mpirun >/dev/null 2>&1; then
  mpirun -n 2 "$BIN/sslsky" mock --survey sdss --n "$N" --seed 1 --out "$OUT/mock" progress=false
else
  "$BIN/sslsky" mock --survey sdss --n "$N" --seed 1 --out "$OUT/mock" progress=false
fi

echo "== 2/6 pack into HDF5 shards -> $OUT/packed"
status=0
if command -v mpirun >/dev/null 2>&1; then
  mpirun -n 2 "$BIN/sslsky" pack --catalog "$OUT/mock/catalog.fits" --out "$OUT/packed" --shard-size 128 progress=false \
    || status=$?
else
  "$BIN/sslsky" pack --catalog "$OUT/mock/catalog.fits" --out "$OUT/packed" --shard-size 128 progress=false || status=$?
fi
if [ "$status" -ne 0 ] && [ "$status" -ne 3 ]; then exit "$status"; fi

echo "== 3/6 read the shards back"
"$BIN/python" utils/inspect_shards.py "$OUT/packed"

echo "== 4/6 MoCo v2 pretraining on CPU (a few minutes) -> $OUT/pretrain"
rm -rf "$OUT/pretrain"  # a fresh run each time (a kept run dir would resume, not retrain)
"$BIN/sslsky" pretrain --config config/pretrain_demo.yaml data.path="$OUT/packed" run_dir="$OUT/pretrain"
"$BIN/python" utils/pretrain_summary.py "$OUT/pretrain"
echo "demo: encoder at $OUT/pretrain/encoder.pt; TensorBoard: $BIN/tensorboard --logdir $OUT/pretrain/tensorboard"

echo "== 5/6 evaluation with the demo encoder: photo-z (linear probe) and morphology (kNN) -> $OUT/eval_*"
# A result folder whose config and encoder bytes are unchanged is reused, not retrained.
"$BIN/python" eval_specz.py --config config/eval_specz.yaml ckpt="$OUT/pretrain/encoder.pt" data.path="$OUT/packed" \
  out="$OUT/eval_specz" protocol=linear device=cpu data.num_workers=0 progress=false
"$BIN/sslsky" eval-morph --config config/eval_morph.yaml ckpt="$OUT/pretrain/encoder.pt" data.path="$OUT/packed" \
  out="$OUT/eval_morph" protocol=knn device=cpu data.num_workers=0 progress=false
"$BIN/python" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
z = json.load(open(f"{out}/eval_specz/metrics.json"))
m = json.load(open(f"{out}/eval_morph/metrics.json"))
b = z["median_z_baseline"]
print(f"photo-z  ({z['protocol']}, {z['n_train_labels']} labels, {z['n_test']} test): sigma_MAD {z['sigma_mad']:.4f} "
      f"bias {z['bias']:+.4f} eta {z['eta']:.3f} CRPS {z['crps']:.4f} | median-z guess: sigma_MAD {b['sigma_mad']:.4f} "
      f"eta {b['eta']:.3f}")
print(f"morphology ({m['protocol']} k={m['knn']['k']}, {m['n_train_labels']} labels, {m['n_test']} test): accuracy "
      f"{m['accuracy']:.3f} macro-F1 {m['macro_f1']:.3f} | majority class: {m['majority_baseline']['accuracy']:.3f}")
print("plots:", *z["plots"], *m["plots"], sep="\n  ")
PY

echo "== 6/6 similarity search with the demo encoder -> $OUT/similarity"
"$BIN/sslsky" embed --ckpt "$OUT/pretrain/encoder.pt" --data "$OUT/packed" --out "$OUT/similarity/embeddings.h5" \
  num_workers=0 progress=false
query=$("$BIN/python" -c "import h5py, sys; print(h5py.File(sys.argv[1], 'r')['object_id'][0])" \
  "$OUT/similarity/embeddings.h5")
"$BIN/sslsky" search --embeddings "$OUT/similarity/embeddings.h5" --query "$query" --k 10 --data "$OUT/packed" \
  --png "$OUT/similarity/neighbours.png"
"$BIN/sslsky" search --embeddings "$OUT/similarity/embeddings.h5" --evaluate --k 10 \
  eval_json="$OUT/similarity/retrieval.json"
echo "demo: done. Plots: $OUT/eval_specz/plots, $OUT/eval_morph/plots, $OUT/similarity/neighbours.png"
