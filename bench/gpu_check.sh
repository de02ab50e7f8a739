#!/usr/bin/env bash
# The GPU check of issue "Beyond one CPU", as one script for a machine with a GPU.
#
#   bench/gpu_check.sh BIN_DIR OUT_DIR
#
# BIN_DIR holds three programs built with `--features nccl` (README: Scaling out):
#   rlhf          target/release/rlhf
#   cuda_tests    the test binary of `cargo test --release --features nccl --test cuda --no-run`
#   bench_train   target/release/examples/bench_train
# (each may be xz-compressed as NAME.xz). CUDA's libraries are looked up in the
# Python environment (pip's nvidia-* wheels, as PyTorch installs them) unless
# LD_LIBRARY_PATH already finds them.
#
# It runs: the CUDA tests (logits against transformers and the CPU, greedy decoding,
# SFT steps against the CPU, NCCL with a world of one); `rlhf sft` on the CPU, on the
# GPU and on the GPU with --bf16 from the same model and data, comparing losses and
# weights; and bench/gpu.py (training tokens/s against PyTorch on the same GPU),
# unless SKIP_BENCH is set.
set -u
BIN=${1:?BIN_DIR}
OUT=${2:?OUT_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" /tmp/rlhf-gpu
for n in rlhf cuda_tests bench_train; do
  if [ -f "$BIN/$n.xz" ]; then xz -dc "$BIN/$n.xz" > /tmp/rlhf-gpu/$n; else cp "$BIN/$n" /tmp/rlhf-gpu/$n; fi
  chmod +x /tmp/rlhf-gpu/$n
done
B=/tmp/rlhf-gpu
# The test binaries find their fixtures under the folder they were built in.
BUILT_IN=$(python3 -c "import re,sys; m=re.search(rb'(/[A-Za-z0-9_./-]+)/tests/fixtures', open(sys.argv[1],'rb').read()); print(m.group(1).decode() if m else '')" $B/cuda_tests)
if [ -n "$BUILT_IN" ] && [ ! -e "$BUILT_IN" ]; then mkdir -p "$(dirname "$BUILT_IN")" && ln -s "$ROOT" "$BUILT_IN"; fi
LIBDIRS=$(python3 - <<'EOF'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for pat in ["nvidia/*/lib", "nvidia/cu*/lib"]:
        for d in glob.glob(os.path.join(sp, pat)):
            dirs.add(d)
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:$LIBDIRS:/usr/local/nvidia/lib64:/usr/local/cuda/lib64
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
ldd $B/cuda_tests | grep -E "cuda|cublas|curand|nccl" | tee -a "$OUT/gpu.txt"

echo "== CUDA tests"
timeout 300 $B/cuda_tests --test-threads 1 --nocapture 2>&1 | tee "$OUT/tests.log"

echo "== rlhf sft: CPU vs GPU vs GPU bf16"
D=$(mktemp -d)
python3 - "$D/sft.jsonl" <<'EOF'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(64):
        f.write(json.dumps({"prompt": f"Question {i}: what is {i} plus {i % 7}?",
                            "completion": f" It is {i + i % 7}."}) + "\n")
EOF
for dev in cpu cuda cuda-bf16; do
  flags="--device ${dev%-bf16}"; [ "$dev" = cuda-bf16 ] && flags="$flags --bf16"
  start=$(date +%s.%N)
  timeout 300 $B/rlhf $flags sft --model "$ROOT/tests/fixtures/gpt2" --dataset "$D/sft.jsonl" \
    --output_dir "$D/$dev" --max_steps 8 --per_device_train_batch_size 8 --learning_rate 1e-3 \
    --logging_steps 1 --save_steps 0 --seed 3 2>&1 | tail -3
  echo "$dev: rlhf sft process $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
done
python3 - "$D" <<'EOF' | tee "$OUT/sft_compare.txt"
import json, sys, numpy as np
from safetensors.numpy import load_file
d = sys.argv[1]
def losses(run):
    out = []
    for line in open(f"{d}/{run}/metrics.jsonl"):
        m = json.loads(line)
        if "train/loss" in m:
            out.append(m["train/loss"])
    return out
ref = load_file(f"{d}/cpu/model.safetensors")
for run in ["cuda", "cuda-bf16"]:
    w = load_file(f"{d}/{run}/model.safetensors")
    diff = max(float(np.abs(w[k] - ref[k]).max()) for k in ref)
    print(json.dumps({"run": run, "max_abs_weight_diff_vs_cpu": diff,
                      "losses": [round(x, 5) for x in losses(run)],
                      "cpu_losses": [round(x, 5) for x in losses("cpu")]}))
EOF

[ -n "${SKIP_BENCH:-}" ] && exit 0   # SKIP_BENCH=1: the checks without the timings
echo "== training throughput vs PyTorch on this GPU"
timeout 420 python3 "$ROOT/bench/gpu.py" --bench $B/bench_train 2>&1 | tee "$OUT/bench.log"
