#!/usr/bin/env python3
"""The GPU check of the CUDA back-end, as one script for a machine with a GPU:

1. the CUDA tests (logits against transformers and the CPU, greedy decoding, SFT
   steps against the CPU, NCCL with a world of one): `tests/cuda.rs`;
2. training throughput on the GPU, rlhf against PyTorch eager on the same GPU in the
   same run, f32 and bf16 autocast, on the tiny and GPT-2 124M shapes. One step =
   forward + cross-entropy + backward + grad clipping + AdamW; each side times its
   whole step inside its own process, after synchronising the GPU, and reports the
   median of the timed steps after warm-up steps. Each side is its own process.

Prints the GPU, driver and CPU, and one JSON line per measurement.

    python3 bench/gpu.py --tests PATH_TO_CUDA_TEST_BINARY --bench PATH_TO_BENCH_TRAIN
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from cpu import describe

SHAPES = [  # label, preset, (layers, width, heads), vocab, batch, seq, steps
    ("tiny", "tiny", (4, 256, 4), 8192, 16, 128, 20),
    ("gpt2-124M", "gpt2", (12, 768, 12), 50257, 8, 512, 20),
]


def torch_side(layers, width, heads, vocab, batch, seq, steps, bf16):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=max(seq, 128), n_embd=width, n_layer=layers, n_head=heads,
                     n_inner=4 * width, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    times = []
    for step in range(steps + 3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps({"seconds": med, "tokens_per_s": batch * seq / med,
                      "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}))


def gpu_name():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
        return out.stdout.strip()
    except OSError as e:
        return f"unknown ({e})"


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--torch":
        *nums, bf16 = sys.argv[2:]
        torch_side(*map(int, nums), bf16 == "bf16")
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", help="the cuda test binary (cargo test --features nccl --test cuda --no-run)")
    ap.add_argument("--bench", required=True, help="examples/bench_train built with --features cuda")
    ap.add_argument("--shapes", default="tiny,gpt2-124M")
    args = ap.parse_args()
    print(f"GPU: {gpu_name()}")
    print(f"CPU: {describe()}")
    try:
        import torch
        import transformers
        print(f"PyTorch {torch.__version__}, transformers {transformers.__version__}")
    except ImportError as e:
        print(f"PyTorch side unavailable: {e}")
    sys.stdout.flush()
    if args.tests:
        r = subprocess.run([args.tests, "--test-threads", "1", "--nocapture"])
        print(f"cuda tests exit code {r.returncode}")
        sys.stdout.flush()
    here = os.path.dirname(os.path.abspath(__file__))
    for label, preset, (layers, width, heads), vocab, batch, seq, steps in SHAPES:
        if label not in args.shapes.split(","):
            continue
        for bf16 in (False, True):
            mode = "bf16" if bf16 else "f32"
            cmd = [args.bench, preset, str(vocab), str(batch), str(seq), str(steps), "cuda"]
            if bf16:
                cmd.append("bf16")
            t0 = time.time()
            ours = subprocess.run(cmd, capture_output=True, text=True)
            ours_wall = time.time() - t0
            if ours.returncode != 0:
                print(json.dumps({"shape": label, "mode": mode, "rlhf_error": ours.stderr[-2000:]}))
                continue
            ours = json.loads(ours.stdout.strip().splitlines()[-1])
            t0 = time.time()
            theirs = subprocess.run([sys.executable, os.path.join(here, "gpu.py"), "--torch", str(layers), str(width),
                                     str(heads), str(vocab), str(batch), str(seq), str(steps), mode],
                                    capture_output=True, text=True)
            theirs_wall = time.time() - t0
            if theirs.returncode != 0:
                print(json.dumps({"shape": label, "mode": mode, "torch_error": theirs.stderr[-2000:]}))
                continue
            theirs = json.loads(theirs.stdout.strip().splitlines()[-1])
            print(json.dumps({
                "shape": label, "mode": mode, "batch": batch, "seq": seq,
                "rlhf_tokens_per_s": round(ours["tokens_per_s"]),
                "torch_tokens_per_s": round(theirs["tokens_per_s"]),
                "ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
                "rlhf_process_s": round(ours_wall, 1), "torch_process_s": round(theirs_wall, 1),
                "torch_peak_gpu_mb": round(theirs["peak_gpu_mb"]),
                "rlhf_phases_s": ours.get("phases_s"),
            }))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
