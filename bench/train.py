#!/usr/bin/env python3
"""Training throughput, rlhf vs PyTorch eager, same GPT-2 shapes, same machine, same
run. One step = forward + cross-entropy + backward + grad clipping + AdamW, f32,
2 threads. Each side runs in its own process so that peak RSS is its own.

What is compared: wall time to wall time, each side's whole training step (all five
parts above; rlhf through the trainer's own code in examples/bench_train), timed
around the step inside each side's process; the median of the timed steps (5 on
tiny, 3 on 124M) after one warm-up step, within one run of this script (not a
median over runs). Prints the CPU it ran on.

    python3 bench/train.py            # torch side skipped (with a message) without torch
    python3 bench/train.py --bf16     # both sides under bf16 autocast (rlhf: needs AMX-BF16)

--bf16: bf16 autocast with f32 master weights on both sides, each as it defines it:
rlhf's `--bf16` (the dense layers' and LM head's products on AMX tiles with f32
results; attention and the rest f32: `src/ops/amx.rs`) against
`torch.autocast("cpu", dtype=torch.bfloat16)` around PyTorch's forward and loss (every
matmul it covers, attention's too, with bf16 results; the backward follows). Not the
same arithmetic: rlhf's keeps more in f32.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from cpu import describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "target", "release", "examples", "bench_train")
SHAPES = [  # label, preset, (layers, width, heads), vocab, batch, seq, steps
    ("tiny", "tiny", (4, 256, 4), 8192, 16, 128, 5),
    ("gpt2-124M", "gpt2", (12, 768, 12), 50257, 4, 128, 3),
]


def torch_side(layers, width, heads, vocab, batch, seq, steps, bf16=0):
    import contextlib
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=max(seq, 128), n_embd=width, n_layer=layers, n_head=heads,
                     n_inner=4 * width, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, vocab, (batch, seq))
    times = []
    for step in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step > 0:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": med, "tokens_per_s": batch * seq / med, "peak_rss_mb": rss}))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--torch":
        torch_side(*map(int, sys.argv[2:]))
        return
    bf16 = "--bf16" in sys.argv[1:]
    subprocess.run(["cargo", "build", "--release", "--example", "bench_train"], cwd=ROOT, check=True)
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
        print("torch is not installed: PyTorch side skipped")
    precision = "bf16 autocast (f32 master weights)" if bf16 else "f32"
    print(f"\ntraining step (fwd + CE + bwd + clip + AdamW), {precision}, 2 threads")
    print(describe())
    print("compared: wall time of each side's whole training step, median of the timed steps after 1 warm-up")
    print(f"{'shape':<11}{'batch':>8}{'rlhf tok/s':>12}{'torch tok/s':>13}{'ratio':>8}{'rlhf RSS':>10}{'torch RSS':>11}")
    for label, preset, (layers, width, heads), vocab, batch, seq, steps in SHAPES:
        env = dict(os.environ, RAYON_NUM_THREADS="2")
        extra = ["cpu", "bf16"] if bf16 else []
        run = subprocess.run([BENCH, preset, str(vocab), str(batch), str(seq), str(steps)] + extra,
                             capture_output=True, text=True, env=env)
        if run.returncode != 0:  # e.g. --bf16 on a CPU without AMX-BF16: its message, not a traceback
            print(run.stderr.strip(), file=sys.stderr)
            return 2
        ours = json.loads(run.stdout)
        theirs = None
        if have_torch:
            out = subprocess.run([sys.executable, __file__, "--torch", str(layers), str(width), str(heads), str(vocab),
                                  str(batch), str(seq), str(steps), str(int(bf16))], check=True, capture_output=True,
                                 text=True).stdout
            theirs = json.loads(out.strip().splitlines()[-1])
        t_tok = f"{theirs['tokens_per_s']:.0f}" if theirs else "-"
        ratio = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if theirs else "-"
        t_rss = f"{theirs['peak_rss_mb']:.0f} MB" if theirs else "-"
        print(f"{label:<11}{f'{batch}x{seq}':>8}{ours['tokens_per_s']:>12.0f}{t_tok:>13}{ratio:>8}"
              f"{ours['peak_rss_mb']:>7.0f} MB{t_rss:>11}")


if __name__ == "__main__":
    sys.exit(main())
