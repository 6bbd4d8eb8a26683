#!/usr/bin/env bash
# The input-pipeline measurements of one lent GPU machine (H100/H200, 16 cores), in one go of about 9 minutes, most
# important first: environment check, ImageNet-like JPEGs on local disk, then `tools/benchmark.py pipeline` at 224 and
# 160 px (batch 256, 14 workers, 8,192 images: the eager ceiling, train.py with decode: auto, what it chose and the
# speeds it compared, any CPU_SHARES; at 160 px also A3's RandAugment on the CPU path, the split and the device ops),
# each auto-augment op's time, train.py
# with decode: auto on 8 cores (the course project's machine class), the torch.compile rows at 224 px, the device's JPEG
# decoders alone, and the loader workers' images per CPU-second. Everything lands in ${OUT:-out}: run.log
# (timestamps, exit codes), one log per step, and summary.md (the tables).
#
#   bash tools/device_benchmark.sh              from the repo root, on the GPU machine
#   TINY=1 bash tools/device_benchmark.sh       the same steps shrunk to run on a CPU in a few minutes (a rehearsal)
#
# Each step runs under its own time limit and a failed step does not stop the next; BUDGET (seconds, default 540)
# bounds the whole. IMAGES, SIZES, STEPS, COMPILE_SIZES, CPU_SHARES and AUTO_AUGMENT shape a run to its lease, and
# FULL=1 adds the loaders-alone rows to each pipeline table; PYTHON (default python3) and BENCH_DATA (where the JPEGs
# go) can be set. timm comes from the caller's environment (e.g. PYTHONPATH); this script only checks its version.
set -u
OUT=${OUT:-out}
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
if [ "${TINY:-0}" = 1 ]; then
  DATA=${BENCH_DATA:-/tmp/bench-data-tiny}; IMAGES=256; SIZES="64 32"; BATCH=16; WORKERS=2; STEPS=2
  CPU_SHARES=${CPU_SHARES-}; COMPILE_SIZES=${COMPILE_SIZES-}; FEW_CORES="0"; FEW_WORKERS=1; WORKER_BATCH=16
  EXTRA=(--device cpu)
else
  DATA=${BENCH_DATA:-/tmp/bench-data}; IMAGES=${IMAGES:-8192}; SIZES=${SIZES-"224 160"}; BATCH=256; WORKERS=14
  STEPS=${STEPS:-20}; FEW_CORES="0-7"; FEW_WORKERS=6; WORKER_BATCH=64
  EXTRA=(--device cuda)
fi
COMPILE_SIZES=${COMPILE_SIZES-224}  # sizes that also get the torch.compile rows (COMPILE_SIZES= for none)
CPU_SHARES=${CPU_SHARES-}  # cpu_decode_share values measured beside auto's (whose log line has the speeds of those it
# timed); CPU_SHARES_<size> for one size
AUTO_AUGMENT=${AUTO_AUGMENT-rand-m6-mstd0.5-inc1}  # RSB A3's, measured at the smallest of SIZES

log() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/run.log"; }

# step NAME LIMIT COMMAND...: run COMMAND with its output in $OUT/NAME.log, for at most LIMIT seconds and never past
# the budget; its exit code is logged and the script goes on either way
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 30)); then log "skip $name: the ${BUDGET} s budget is spent"; return; fi
  ((limit > left)) && limit=$left
  log "start $name (limit ${limit} s)"
  timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local code=$?
  log "end $name: exit $code$( ((code == 124 || code == 137)) && echo ' (time limit)')"
}

log "device benchmark: TINY=${TINY:-0}, data $DATA, $IMAGES images, sizes $SIZES, batch $BATCH, $WORKERS workers"
step env 60 "$PYTHON" - <<'EOF'
import io, os, platform, shutil, subprocess, time
import PIL, numpy, timm, torch, torchvision
from PIL import Image, features
print(f'python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), '
      f'torchvision {torchvision.__version__}, timm {timm.__version__}, Pillow {PIL.__version__}, '
      f'numpy {numpy.__version__}')
print(f'libjpeg-turbo in Pillow: {features.check_feature("libjpeg_turbo")}; CPU cores: {os.cpu_count()}; '
      f'free in /tmp: {shutil.disk_usage("/tmp").free / 1e9:.0f} GB')
if timm.__version__ != '1.0.31':
    print(f'WARNING: timm {timm.__version__}, not the pinned 1.0.31')
if torch.cuda.is_available():
    print(f'GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, '
          f'bf16 {torch.cuda.is_bf16_supported()}')
    buffer = io.BytesIO()
    Image.new('RGB', (400, 350), (200, 120, 40)).save(buffer, 'JPEG', quality=90)
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    try:
        images = torchvision.io.decode_jpeg([data] * 256, device='cuda')
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            images = torchvision.io.decode_jpeg([data] * 256, device='cuda')
        torch.cuda.synchronize()
        print(f'nvjpeg (torchvision.io.decode_jpeg on cuda): ok, {tuple(images[0].shape)}, '
              f'{5 * 256 / (time.perf_counter() - start):,.0f} img/s on a plain 400 x 350 image')
    except Exception as e:
        print(f'nvjpeg (torchvision.io.decode_jpeg on cuda): FAILED {type(e).__name__}: {e}')
    print(subprocess.run(['nvidia-smi'], capture_output=True, text=True).stdout)
else:
    print('GPU: none (CUDA not available)')
EOF
step jpegs 150 "$PYTHON" tools/benchmark.py jpegs --images "$IMAGES" --cache "$DATA"
small=$(echo $SIZES | tr ' ' '\n' | sort -n | head -1)
for size in $SIZES; do
  shares="CPU_SHARES_$size"  # CPU_SHARES_160=... sets one size's shares
  step "pipeline-$size" 300 env PYTHONUNBUFFERED=1 "$PYTHON" tools/benchmark.py pipeline --images "$IMAGES" \
    --cache "$DATA" --img-size "$size" -b "$BATCH" -j "$WORKERS" --steps "$STEPS" "${EXTRA[@]}" \
    --cpu-shares ${!shares-$CPU_SHARES} $( [ "${FULL:-0}" = 1 ] || echo --quick) \
    $( [ "$size" = "$small" ] && [ -n "$AUTO_AUGMENT" ] && echo --auto-augment "$AUTO_AUGMENT") \
    --out "$OUT/pipeline-$size.md"
done
step augment-ops 90 "$PYTHON" tools/benchmark.py augment-ops --sizes $small -b "$BATCH" "${EXTRA[@]}" \
  --out "$OUT/pipeline-ops.md"
# decode: auto with the trainer and its workers on 8 cores, as on the course project's g5.2xlarge (8 vCPU)
step "cores8-$small" 200 env PYTHONUNBUFFERED=1 taskset -c "$FEW_CORES" "$PYTHON" tools/benchmark.py pipeline \
  --images "$IMAGES" --cache "$DATA" --img-size "$small" -b "$BATCH" -j "$FEW_WORKERS" --steps "$STEPS" \
  "${EXTRA[@]}" --quick --out "$OUT/pipeline-$small-cores8.md"
for size in $COMPILE_SIZES; do  # compiling takes a minute or two, and a run cut short keeps the tables above
  step "compiled-$size" 300 env PYTHONUNBUFFERED=1 "$PYTHON" tools/benchmark.py pipeline --images "$IMAGES" \
    --cache "$DATA" --img-size "$size" -b "$BATCH" -j "$WORKERS" --steps "$STEPS" "${EXTRA[@]}" --compile \
    --out "$OUT/pipeline-$size-compiled.md"
done
# the device's JPEG decoders alone, on batches of the generated files: img/s and the pixels' difference from PIL's
step decoders 60 "$PYTHON" - "$DATA" "$BATCH" "${EXTRA[1]}" <<'EOF'
import sys, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
from training.data.device_decode import JpegDecoder
data, batch, device = Path(sys.argv[1]), int(sys.argv[2]), torch.device(sys.argv[3])
files = sorted(f for f in data.rglob('*') if f.suffix.lower() in ('.jpg', '.jpeg') and '/train/' in str(f))
encoded = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files[:4 * batch]]
sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
for which in ('torchvision', 'nvimgcodec'):
    try:
        decoder = JpegDecoder(device, which)
    except Exception as e:
        print(f'{which}: not available: {e}')
        continue
    decoder(encoded[:batch])
    sync()
    start = time.perf_counter()
    images = [image for i in range(0, len(encoded), batch) for image in decoder(encoded[i:i + batch])]
    sync()
    speed = len(encoded) / (time.perf_counter() - start)
    used = 'nvImageCodec' if decoder.nvimgcodec else 'torchvision'
    diff = np.mean([np.abs(images[i].cpu().permute(1, 2, 0).numpy().astype(int) -
                           np.asarray(Image.open(files[i]).convert('RGB')).astype(int)).mean() for i in range(64)])
    print(f'{which}: {speed:,.0f} img/s over {len(encoded)} files in batches of {batch} (decoded by {used}); '
          f'mean difference from PIL {diff:.2f} levels of 255')
EOF
# one loader worker's images per CPU-second, with and without auto-augment: how many cores auto needs
step workers 120 "$PYTHON" tools/benchmark.py workers --images "$IMAGES" --cache "$DATA" --sizes $SIZES \
  -b "$WORKER_BATCH" -j 1 --batches 8 --repeats 2 $( [ -n "$AUTO_AUGMENT" ] && echo --auto-augment "$AUTO_AUGMENT") \
  --out "$OUT/pipeline-workers.md"
cat "$OUT"/pipeline-*.md >"$OUT/summary.md" 2>/dev/null
rm -f "$OUT"/pipeline-*.md  # their tables are in summary.md and in the logs: fewer files come back
log "done; tables in $OUT/summary.md"
