#!/usr/bin/env python3
"""Generation throughput, rlhf vs transformers' generate, on the same model folders in
the same run (torch CPU, 2 threads). 8 prompts x 32 tokens, 64 new tokens, sampling,
KV cache. Prints a table with the ratio, and the CPU it ran on.

What is compared: wall time to wall time, each side's whole generate call (rlhf's
`generate` in examples/bench_generate, transformers' `model.generate` here), timed
around the call inside each side's own process; the median of 3 calls after one
warm-up call, within one run of this script (not a median over runs).

    python3 bench/generate.py            # needs torch + transformers for the comparison

Without torch the transformers column is skipped with a message.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from cpu import describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RLHF = os.path.join(ROOT, "target", "release", "rlhf")
BENCH = os.path.join(ROOT, "target", "release", "examples", "bench_generate")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer.json")
BATCH, PROMPT, NEW, REPEATS = 8, 32, 64, 3
SHAPES = [("tiny", "tiny", 8192), ("gpt2-124M", "gpt2", 50257)]


def build():
    subprocess.run(["cargo", "build", "--release", "--bin", "rlhf", "--example", "bench_generate"], cwd=ROOT, check=True)


def torch_generate(folder):
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vocab = 400  # prompts drawn from the tokenizer's ids, as on the rlhf side
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, PROMPT), generator=g)
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, use_cache=True)
        assert out.shape[1] == PROMPT + NEW

    run()
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    build()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, preset, vocab in SHAPES:
            d = os.path.join(tmp, label)
            subprocess.run([RLHF, "init", "--arch", "gpt2", "--preset", preset, "--tokenizer", TOKENIZER,
                            "--vocab_size", str(vocab), "--output_dir", d], check=True)
            env = dict(os.environ, RAYON_NUM_THREADS="2")
            out = subprocess.run([BENCH, d, str(BATCH), str(PROMPT), str(NEW), str(REPEATS)], check=True,
                                 capture_output=True, text=True, env=env).stdout
            ours = json.loads(out)["seconds"]
            theirs = torch_generate(d)
            rows.append((label, ours, theirs))
    tokens = BATCH * NEW
    print(f"\ngeneration, {BATCH} prompts x {PROMPT} tokens, {NEW} new tokens, sampling, 2 threads")
    print(describe())
    print(f"compared: wall time of each side's whole generate call, median of {REPEATS} calls after 1 warm-up")
    print(f"{'shape':<12}{'rlhf tok/s':>12}{'transformers tok/s':>20}{'ratio':>8}")
    for label, ours, theirs in rows:
        if theirs is None:
            print(f"{label:<12}{tokens / ours:>12.1f}{'(torch not installed)':>20}")
        else:
            print(f"{label:<12}{tokens / ours:>12.1f}{tokens / theirs:>20.1f}{theirs / ours:>7.2f}x")


if __name__ == "__main__":
    sys.exit(main())
