#!/usr/bin/env python3
"""Reward-model training throughput (comparisons/s): rlhf's K-way batching (each of a
prompt's K responses forwarded once, all C(K,2) comparisons in the loss) against a
PyTorch implementation that forwards every comparison's two sequences separately, as
TRL's RewardTrainer does. Same GPT-2 shape, same sequences per step (so the same
forward cost), same machine, same run; f32, 2 threads.

What is compared: wall time to wall time, each side's whole training step (forward,
loss, backward, clipping, AdamW; rlhf through `RmTask` in examples/bench_rm), timed
around the step inside each side's own process; the median of --steps timed steps
after one warm-up step, within one run of this script (not a median over runs).
Prints the CPU it ran on.

    python3 bench/rm.py [--shape tiny|gpt2]      # torch side skipped without torch
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from cpu import describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "target", "release", "examples", "bench_rm")
SHAPES = {"tiny": ("tiny", (4, 256, 4), 8192), "gpt2": ("gpt2", (12, 768, 12), 50257)}
PROMPT, RESPONSE = 64, 64


def torch_side(layers, width, heads, vocab, sequences, steps):
    """TRL-style: sequences/2 comparisons per step, chosen and rejected forwarded."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2ForSequenceClassification
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=width, n_layer=layers, n_head=heads, num_labels=1,
                     pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2ForSequenceClassification(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    pairs = sequences // 2
    chosen = torch.randint(1, vocab, (pairs, PROMPT + RESPONSE))
    rejected = torch.randint(1, vocab, (pairs, PROMPT + RESPONSE))
    times = []
    for step in range(steps + 1):
        t = time.perf_counter()
        rc = model(chosen).logits.squeeze(-1)
        rr = model(rejected).logits.squeeze(-1)
        loss = -F.logsigmoid(rc - rr).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step > 0:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps({"seconds": med, "comparisons_per_s": pairs / med}))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--torch":
        torch_side(*map(int, sys.argv[2:]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gpt2", choices=SHAPES)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    preset, (layers, width, heads), vocab = SHAPES[args.shape]
    subprocess.run(["cargo", "build", "--release", "--example", "bench_rm"], cwd=ROOT, check=True)
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
        print("torch is not installed: PyTorch side skipped")
    print(f"\nreward-model step, {args.shape} shape, prompt {PROMPT} + response {RESPONSE} tokens, f32, 2 threads")
    print(describe())
    print(f"compared: wall time of each side's whole training step, median of {args.steps} timed steps after 1 warm-up")
    print(f"{'K':>3}{'seqs/step':>11}{'rlhf cmp/s':>12}{'torch cmp/s':>13}{'ratio':>8}")
    for k, prompts in [(4, 2), (9, 1)]:
        seqs = k * prompts
        env = dict(os.environ, RAYON_NUM_THREADS="2")
        ours = json.loads(subprocess.run([BENCH, preset, str(vocab), str(k), str(prompts), str(PROMPT), str(RESPONSE),
                                          str(args.steps)], check=True, capture_output=True, text=True, env=env).stdout)
        theirs = None
        if have_torch:
            # The same number of sequences per step (rounded down to whole pairs).
            out = subprocess.run([sys.executable, __file__, "--torch", str(layers), str(width), str(heads), str(vocab),
                                  str(seqs - seqs % 2), str(args.steps)], check=True, capture_output=True, text=True)
            theirs = json.loads(out.stdout.strip().splitlines()[-1])
        t = f"{theirs['comparisons_per_s']:.2f}" if theirs else "-"
        r = f"{ours['comparisons_per_s'] / theirs['comparisons_per_s']:.2f}x" if theirs else "-"
        print(f"{k:>3}{seqs:>11}{ours['comparisons_per_s']:>12.2f}{t:>13}{r:>8}")


if __name__ == "__main__":
    sys.exit(main())
