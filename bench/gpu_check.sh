#!/usr/bin/env bash
# Issue 4's device check, in one call on the lent GPU machine (bench/README.md, "GPU check"):
# builds vasipc there, runs the GPU tests, and measures every issue-4 target, writing
# everything under $OUT (summary.md first). Budget: under 8 minutes.
#
# Before it (bench/README.md, "GPU check"): the onnxruntime-gpu wheel's parts in /tmp/w on
# the warm machine (one call per part), cp312 wheels of the runtime dependencies the image
# lacks (orjson, nudenet) in .whl/, and the model in .gpu/ (built here:
# `python tests/family_models.py .gpu/compute-640.onnx`). bench/gpu/ goes on PYTHONPATH: its
# sitecustomize.py loads the CUDA libraries (preload_cuda.py) in every Python process.
#
#   bash bench/gpu_check.sh          # on the device (repo root; $OUT set by the tool)
#   bash bench/gpu_check.sh --cpu    # here, without a GPU: the same steps on the CPU,
#                                    # short runs, to test the script itself
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-gpu}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
MODEL=${VASIPC_BENCH_MODEL:-$(ls .gpu/*.onnx 2>/dev/null | head -1)}
log() { echo "== $*" | tee -a "$OUT/log.txt"; }
started=$(date +%s)

if [ "$MODE" = "--cpu" ]; then
  PY=${PY:-python3}; DEVICE=cpu; C1_S=4; CN_S=4; CN=8; BATCH=4; BATCHES=1,2; REF_S=1
else
  PY=python3; DEVICE=cuda; C1_S=10; CN_S=15; CN=64; BATCH=32; BATCHES=1,16,64; REF_S=3
  log "install onnxruntime-gpu and the carried wheels into /tmp/site"
  wheel=/tmp/w/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
  [ -f "$wheel" ] || cat /tmp/w/ort.p.* > "$wheel"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel" .whl/*.whl \
    >> "$OUT/log.txt" 2>&1 || { log "pip install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/bench/gpu:$PWD
  log "build vasipc in place"
  $PY build.py >> "$OUT/log.txt" 2>&1 || { log "build failed"; exit 1; }
  nvidia-smi -L > "$OUT/gpu.txt" 2>&1
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
if [ -z "$MODEL" ]; then  # the project's own 640 detector (needs onnx where this runs)
  MODEL=$(mkdir -p bench/out && $PY tests/family_models.py bench/out/compute-640.onnx) \
    || { log "no model: put one in .gpu/ (python tests/family_models.py .gpu/compute-640.onnx)"; exit 1; }
fi
$PY -c "import onnxruntime as o, vasipc; print(o.__version__, o.get_available_providers())" \
  > "$OUT/runtime.txt" 2>&1
log "runtime: $(cat "$OUT/runtime.txt")"

log "vasipc check (onboarding: load, warm up, one synthetic frame) on $DEVICE"
$PY -m vasipc.check "$MODEL" --device "$DEVICE" > "$OUT/check.txt" 2>&1
echo "check rc=$?" >> "$OUT/check.txt"; grep -E "providers|one run|rc=" "$OUT/check.txt" | tee -a "$OUT/log.txt"

log "GPU tests"
$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_preprocess_graph.py \
  $(ls tests/test_device_path.py 2>/dev/null) > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/tests.txt"; tail -3 "$OUT/tests.txt" | tee -a "$OUT/log.txt"

log "in-process session.run on the same device ($MODEL)"
$PY bench/gpu_ref.py --model "$MODEL" --device "$DEVICE" --batches "$BATCHES" \
  --seconds "$REF_S" --json "$OUT/session_run.json" > "$OUT/session_run.md" 2>&1
cat "$OUT/session_run.md" >> "$OUT/log.txt"

# One server per batching setting; 1080p NV12 frames through the socket (vasipc.bench
# writes them into /dev/shm); GPU utilization sampled alongside.
serve_and_load() {  # name max_batch [server options...]
  local name=$1 mb=$2 sock=/tmp/gpu_check_$1.sock
  shift 2
  rm -f "$sock"
  $PY -m vasipc.serve --model "$MODEL" --model-id bench --device "$DEVICE" --socket "$sock" \
    --max-batch "$mb" --batch-timeout-us 1000 ${VASIPC_CHECK_ARGS:-} "$@" > "$OUT/server_$name.txt" 2>&1 &
  local spid=$!
  for _ in $(seq 1 600); do [ -S "$sock" ] && break; sleep 0.2; done
  if [ ! -S "$sock" ]; then log "server $name did not start"; kill $spid 2>/dev/null; return 1; fi
  local upid=""
  if command -v nvidia-smi >/dev/null && [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 \
      > "$OUT/util_$name.txt" 2>/dev/null & upid=$!
  fi
  $PY -m vasipc.bench --socket "$sock" -c 1 --duration "$C1_S" --quiet \
    --json "$OUT/${name}_c1.json" > "$OUT/${name}_c1.txt" 2>&1
  $PY -m vasipc.bench --socket "$sock" -c "$CN" --duration "$CN_S" --quiet \
    --json "$OUT/${name}_cN.json" > "$OUT/${name}_cN.txt" 2>&1
  [ -n "$upid" ] && kill $upid 2>/dev/null
  kill -TERM $spid; wait $spid 2>/dev/null
  log "$name: $(grep -h throughput "$OUT/${name}_cN.txt")"
}
log "server, batching on (--max-batch $BATCH)"; serve_and_load batched "$BATCH"
log "server, batching off (--max-batch 1)"; serve_and_load unbatched 1
# issue 11: the TensorRT provider (fp16, engines built during warm-up, cached in $OUT/trt)
if $PY -c "import onnxruntime as o, sys; sys.exit('TensorrtExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  log "server, TensorRT fp16 (--max-batch $BATCH)"
  serve_and_load tensorrt "$BATCH" --backend tensorrt --cache-dir "$OUT/trt"
else
  log "no TensorRT provider in this onnxruntime: tensorrt rows skipped"
fi

$PY - "$OUT" "$CN" > "$OUT/summary.md" <<'PYEOF'
import json, os, sys
out, cn = sys.argv[1], sys.argv[2]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
def util(name):
    try:
        vals = [float(v) for v in open(os.path.join(out, f"util_{name}.txt")) if v.strip()]
        return sum(vals) / len(vals) if vals else None
    except OSError:
        return None
fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)
print("# GPU check\n")
for line in open(os.path.join(out, "runtime.txt")):
    print("runtime:", line.strip())
if os.path.exists(os.path.join(out, "gpu.txt")):
    print("card:", open(os.path.join(out, "gpu.txt")).read().strip())
print("\n| run | req/s | p50 ms | p90 ms | p99 ms | errors | batch (median / mean) | GPU util % |")
print("|---|---|---|---|---|---|---|---|")
res = {}
for name in ("batched", "unbatched", "tensorrt"):
    for c in ("c1", "cN"):
        s = load(f"{name}_{c}.json")
        res[(name, c)] = s
        if not s:
            if name != "tensorrt":
                print(f"| {name} {c} | missing | | | | | | |")
            continue
        lat, srv = s["latency_ms"], s["server_ms"]
        print(f"| {name} {c if c == 'c1' else 'c' + cn} | {s['throughput_rps']:.1f} | {fmt(lat['p50'])} | "
              f"{fmt(lat['p90'])} | {fmt(lat['p99'])} | {sum(s['errors'].values())} | "
              f"{fmt(srv.get('batch_size'), 'g')} / {fmt(srv.get('batch_size_mean'))} | "
              f"{fmt(util(name), '.0f') if c == 'cN' else ''} |")
ref = load("session_run.json")
if ref:
    print("\nsession.run in process, same device:\n")
    for r in ref["rows"]:
        print(f"- {r['path']}, batch {r['batch']}: p50 {r['p50_ms']:.2f} ms, {r['images_per_s']:.0f} images/s")
b1, bn, un = res[("batched", "c1")], res[("batched", "cN")], res[("unbatched", "cN")]
print("\ntargets (issue 4):")
if b1:
    print(f"- c1 p50 <= 2.5 ms: {fmt(b1['latency_ms']['p50'])} ms")
if bn:
    print(f"- c{cn} >= 2500 frames/s: {bn['throughput_rps']:.0f}; p99 < 40 ms: {fmt(bn['latency_ms']['p99'])} ms")
if bn and un and un["throughput_rps"]:
    print(f"- batching on / off >= 3x: {bn['throughput_rps'] / un['throughput_rps']:.2f}x")
t1, tn = res[("tensorrt", "c1")], res[("tensorrt", "cN")]
if t1 and b1 and tn and bn:
    print(f"\nissue 11: TensorRT fp16 / CUDA EP: c1 p50 {fmt(t1['latency_ms']['p50'])} vs "
          f"{fmt(b1['latency_ms']['p50'])} ms; c{cn} {tn['throughput_rps']:.0f} vs "
          f"{bn['throughput_rps']:.0f} req/s ({tn['throughput_rps'] / bn['throughput_rps']:.2f}x)")
PYEOF
cat "$OUT/summary.md"
log "done in $(( $(date +%s) - started )) s"
