#!/usr/bin/env bash
# Every GPU check of cryoves in one command, for a lent GPU machine (Python 3.12 with torch, numba,
# scipy, pyarrow, scikit-image, pandas, tqdm, pytest; no TensorFlow, Keras or Ray; no network).
#
# Here, once, from the repository root: fetch the wheels it lacks into .whl/ (ignored by git):
#     bash benchmarks/gpu_session.sh --fetch-wheels
# Then run it there with .whl carried; it writes gpu.json and logs to $OUT (default /tmp/cryoves_gpu):
#     bash benchmarks/gpu_session.sh
# A dry run on a CPU machine (small sizes, the Python already installed, no wheels):
#     bash benchmarks/gpu_session.sh --smoke
# and back here: python benchmarks/results.py --large --gpu gpu.json > benchmarks/RESULTS.md
#
# Steps (about 5 minutes on one H100/H200): install cryoves and the wheels into /tmp/site; the GPU
# equality tests (tests/engine/test_torch_unet_gpu.py); tiled inference of 174x684x684 in float32 and
# float16 plus the whole pipeline of a 1024x1024x261 phantom at 14.69 Å (gpu.json); float16 with a
# 64 GB tile budget, the whole volume in one tile (gpu_one_tile.json).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        mrcfile==1.5.4 imodmodel==0.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5
fi

OUT=${OUT:-/tmp/cryoves_gpu}
SITE=$(mktemp -d /tmp/cryoves_site.XXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ "${1:-}" == "--smoke" ]]; then
    SIZE=(--device cpu --size small)
    ONE_TILE=float32
else
    SIZE=()
    ONE_TILE=float16
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SITE" . \
    || exit 1
export PYTHONPATH=$SITE

echo "== GPU equality tests"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/engine/test_torch_unet_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"

echo "== inference and pipeline"
timeout 420 python3 benchmarks/gpu_inference.py "${SIZE[@]}" --json "$OUT/gpu.json" 2>&1 | tail -n 40 | tee "$OUT/gpu_inference.log"

echo "== one tile"
timeout 180 python3 benchmarks/gpu_inference.py "${SIZE[@]}" --skip-pipeline --precisions "$ONE_TILE" --memory-gb 64 \
    --json "$OUT/gpu_one_tile.json" 2>&1 | tail -n 12 | tee "$OUT/gpu_one_tile.log"

python3 - "$OUT" <<'PY'
import json, sys
from math import prod
from pathlib import Path

for name in ("gpu.json", "gpu_one_tile.json"):
    path = Path(sys.argv[1]) / name
    if not path.exists():
        print(f"{name}: missing")
        continue
    record = json.loads(path.read_text())
    window = prod(record["plan"]["window_shape"]) * record["plan"]["batch_size"]
    for precision, r in record["inference"].items():
        print(f"{name} {precision}: {r['mvoxel_per_s']:.1f} Mvoxel/s, {record['plan']['n_tiles']} tiles"
              + (f", GPU peak {r['gpu_peak_memory_gb']:.1f} GB = {r['gpu_peak_memory_gb'] * 1e9 / window:.0f} "
                 "bytes per window voxel" if r["gpu_peak_memory_gb"] else ""))
    if "pipeline_seconds" in record:
        print(f"{name} pipeline {record['pipeline_seconds']:.2f} s: {record['stage_seconds']}")
PY
