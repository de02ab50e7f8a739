#!/usr/bin/env python3
"""PPO iteration time and peak memory: `rlhf ppo` against TRL's PPOTrainer on the same
model folders, batch and machine, in the same run. 16 prompts x 64 new tokens per
iteration, 1 PPO epoch, 4 minibatches, f32, 2 threads; random GPT-2 policy (from
`rlhf init`) and a reward model from one `rlhf rm train` step.

TRL 1.x no longer ships PPOTrainer; the last releases that do need transformers 4.x.
Install them beside the main environment and point --trl_path at them:

    pip install --target /work/trl-old --no-deps trl==0.19.1 transformers==4.53.3 \\
        accelerate==1.8.1 datasets==3.6.0 tokenizers==0.21.4 huggingface_hub==0.34.4
    pip install --target /work/trl-old requests pyarrow dill multiprocess xxhash pandas 'fsspec<=2025.3.0' psutil
    python3 bench/ppo.py --shape tiny --trl_path /work/trl-old
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RLHF = os.path.join(ROOT, "target", "release", "rlhf")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer.json")
SHAPES = {"tiny": ("tiny", 8192), "gpt2": ("gpt2", 50257)}
PROMPTS, PROMPT_TOKENS, NEW, MINI = 16, 32, 64, 4
WORDS = "the cat sat on mat alice has three apples and bob two together they five once upon a time".split()


def trl_side(policy, rm, prompts_file, iterations, out):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast
    from trl import PPOConfig, PPOTrainer
    torch.set_num_threads(2)
    tok = PreTrainedTokenizerFast.from_pretrained(policy)
    rows = [json.loads(l)["prompt"] for l in open(prompts_file)]
    ds = Dataset.from_dict({"input_ids": [tok(r)["input_ids"] for r in rows]})
    cfg = PPOConfig(output_dir=out, per_device_train_batch_size=MINI, gradient_accumulation_steps=1,
                    num_mini_batches=PROMPTS // MINI, num_ppo_epochs=1, response_length=NEW,
                    total_episodes=PROMPTS * iterations, learning_rate=1e-5, temperature=1.0,
                    report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
                    missing_eos_penalty=None, stop_token=None, num_sample_generations=0, local_rollout_forward_batch_size=PROMPTS,
                    dataloader_num_workers=0)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(policy),
                         ref_model=AutoModelForCausalLM.from_pretrained(policy),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(rm),
                         value_model=AutoModelForSequenceClassification.from_pretrained(rm),
                         train_dataset=ds, eval_dataset=ds)
    t = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds_per_iteration": total / iterations, "peak_rss_mb": rss}))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--trl":
        trl_side(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=SHAPES)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--trl_path", default=None, help="site folder holding trl<=0.19 and transformers 4.x")
    a = ap.parse_args()
    preset, vocab = SHAPES[a.shape]
    subprocess.run(["cargo", "build", "--release", "--bin", "rlhf"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        policy, rm = os.path.join(tmp, "policy"), os.path.join(tmp, "rm")
        subprocess.run([RLHF, "init", "--arch", "gpt2", "--preset", preset, "--tokenizer", TOKENIZER,
                        "--vocab_size", str(vocab), "--output_dir", policy], check=True)
        ranks = os.path.join(tmp, "ranks.jsonl")
        with open(ranks, "w") as f:
            f.write(json.dumps({"prompt": "the cat", "chosen": "sat on the mat", "rejected": "no"}) + "\n")
        subprocess.run([RLHF, "rm", "train", "--model", policy, "--data", ranks, "--output_dir", rm, "--max_steps", "1"],
                       check=True, capture_output=True)
        prompts = os.path.join(tmp, "prompts.jsonl")
        with open(prompts, "w") as f:
            for i in range(PROMPTS):
                words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(PROMPT_TOKENS)]
                f.write(json.dumps({"prompt": " ".join(words)}) + "\n")
        out = os.path.join(tmp, "out")
        env = dict(os.environ, RAYON_NUM_THREADS="2")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run([RLHF, "ppo", "--model", policy, "--reward_model", rm, "--data", prompts, "--output_dir", out,
                        "--rollout_batch_size", str(PROMPTS), "--mini_batch_size", str(MINI), "--ppo_epochs", "1",
                        "--max_new_tokens", str(NEW), "--num_iterations", str(a.iterations), "--logging_steps", "1",
                        "--save_steps", "0"], check=True, env=env, capture_output=True)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        iters = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if "objective/scores" in l]
        body = iters  # every iteration, warm-up included, as TRL's average below
        split = {k: sum(m[k] for m in body) / len(body) for k in ["time/rollout", "time/scoring", "time/update"]}
        ours = sum(split.values())
        theirs = None
        if a.trl_path:
            tenv = dict(os.environ, PYTHONPATH=a.trl_path, TOKENIZERS_PARALLELISM="false")
            r = subprocess.run([sys.executable, __file__, "--trl", policy, rm, prompts, str(a.iterations),
                                os.path.join(tmp, "trl")], capture_output=True, text=True, env=tenv)
            if r.returncode != 0:
                print(r.stderr[-3000:])
                raise SystemExit("TRL side failed")
            theirs = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"\nPPO iteration, {a.shape}: {PROMPTS} prompts x {NEW} new tokens, 1 epoch, {PROMPTS // MINI} minibatches")
        print(f"rlhf: {ours:.2f} s/iteration (rollout {split['time/rollout']:.2f}, scoring {split['time/scoring']:.2f}, "
              f"update {split['time/update']:.2f}), peak RSS {rss:.0f} MB")
        if theirs:
            print(f"TRL PPOTrainer: {theirs['seconds_per_iteration']:.2f} s/iteration, peak RSS {theirs['peak_rss_mb']:.0f} MB")
            print(f"speed ratio {theirs['seconds_per_iteration'] / ours:.2f}x, memory ratio {rss / theirs['peak_rss_mb']:.2f}")
        else:
            print("TRL side skipped (give --trl_path)")


if __name__ == "__main__":
    sys.exit(main())
