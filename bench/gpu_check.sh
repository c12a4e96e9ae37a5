#!/usr/bin/env bash
# One call on the GPU machine (the device tool): the CUDA tests, then bench/gpu.py, each
# under a time limit, everything it reports under $OUT. Prepare here first:
#   ../shared/gpu/wheels.sh .gpu/whl pytest psutil hypothesis simplejpeg && echo /.gpu/ >> .git/info/exclude
# then run `bash bench/gpu_check.sh` there, carrying .gpu. About 7 minutes as set:
#   PARTS    bench/gpu.py --parts (default jpeg: ResNet-50 from JPEG shards, issue 13, whose
#            table now also has each run's data share and MFU, issue 26;
#            resnet18,overhead are issue 12's, about 5 more minutes)
#   TESTS    pytest -k expression for tests/test_cuda.py (default: all of them)
#   JPEG_BENCH=1  also bench/jpeg_bench.py (CPU decoding per process, ours vs webdataset)
#   NOISE=1  also the noise scale's cost on the GPU: bench/overhead.py ours vs ours-nonoise
#            (about 2 minutes; docs/benchmarks.md#the-noise-scales-cost)
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl \
    >"$OUT/install.log" 2>&1 || echo "wheel install failed: see install.log" >>"$OUT/summary.txt"
export PYTHONPATH=/tmp/site:$PWD WANDB_MODE=offline WANDB_SILENT=true
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python3 -c 'import torch, torchvision, PIL; print(torch.__version__, torchvision.__version__, PIL.__version__)
import ddp.data.images as i; print("simplejpeg:", i._simplejpeg() is not None)' \
    >"$OUT/versions.txt" 2>&1
python3 -m ddp.shards.cli prepare digits --out data/digits >"$OUT/prepare.log" 2>&1
start=$SECONDS
timeout "${CUDA_TESTS_S:-200}" python3 -m pytest -q -x -m cuda -p no:cacheprovider \
    ${TESTS:+-k "$TESTS"} tests/test_cuda.py >"$OUT/cuda-tests.txt" 2>&1
echo "cuda tests: exit $? in $((SECONDS - start)) s" >>"$OUT/summary.txt"
start=$SECONDS
timeout "${BENCH_S:-240}" python3 bench/gpu.py --parts "${PARTS:-jpeg}" --json "$OUT/gpu.json" \
    --work /tmp/gpu-bench >"$OUT/gpu-bench.txt" 2>&1
echo "bench/gpu.py --parts ${PARTS:-jpeg}: exit $? in $((SECONDS - start)) s" >>"$OUT/summary.txt"
cp -r /tmp/gpu-bench/logs "$OUT/bench-logs" 2>/dev/null
if [ "${JPEG_BENCH:-0}" = 1 ]; then
    start=$SECONDS
    timeout 120 python3 bench/jpeg_bench.py --num-samples 2000 --repeats 2 \
        --prepare-workers 16 --json "$OUT/jpeg-bench.json" >"$OUT/jpeg-bench.txt" 2>&1
    echo "bench/jpeg_bench.py: exit $? in $((SECONDS - start)) s" >>"$OUT/summary.txt"
fi
if [ "${NOISE:-0}" = 1 ]; then
    start=$SECONDS
    timeout 180 python3 bench/overhead.py --programs ours,ours-nonoise --repeats 2 \
        --no-scaling --json "$OUT/overhead-noise.json" >"$OUT/overhead-noise.txt" 2>&1
    echo "bench/overhead.py ours vs ours-nonoise: exit $? in $((SECONDS - start)) s" >>"$OUT/summary.txt"
fi
cat "$OUT/summary.txt"
tail -n 30 "$OUT/gpu-bench.txt"
