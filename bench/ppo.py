#!/usr/bin/env python3
"""PPO training time and peak memory: `rlhf ppo` against TRL's PPOTrainer on the same
model folders, batch and machine, in the same run. 16 prompts x 64 new tokens per
iteration, 1 PPO epoch, 4 minibatches, f32, 2 threads; random GPT-2 policy (from
`rlhf init`) and a reward model from one `rlhf rm train` step, used as reward and
value model on both sides.

What is compared: wall time to wall time, twice.
  - The training call: rlhf's `train()` (what `rlhf ppo` reports as "N steps in S s":
    the whole loop, rollouts, scoring, updates, and the final checkpoint and model it
    writes) against TRL's `trainer.train()` (which writes nothing: save_strategy "no").
    Model loading and setup are outside both. This is the headline ratio;
    s/iteration = the call / iterations, the first iteration included.
  - The whole process: `rlhf ppo` against the TRL child process (interpreter start,
    imports, model loading, PPOTrainer setup and train()), each timed from outside.
rlhf's own time/rollout, time/scoring, time/update metrics are printed as its split
only, never summed against the peer's clock. Peak RSS: each process's own high-water
mark (os.wait4).

TRL 1.x no longer ships PPOTrainer; the last releases that do need transformers 4.x.
Install them into bench/trl-0.19 (ignored by git), beside the main environment:

    pyenv/bin/python -m pip install --target bench/trl-0.19 --no-deps trl==0.19.1 \\
        transformers==4.53.3 accelerate==1.8.1 datasets==3.6.0 tokenizers==0.21.4 huggingface_hub==0.34.4
    pyenv/bin/python -m pip install --target bench/trl-0.19 requests pyarrow dill multiprocess xxhash \\
        pandas 'fsspec<=2025.3.0' psutil
    pyenv/bin/python bench/ppo.py --shape tiny
    pyenv/bin/python bench/ppo.py --shape gpt2 --iterations 2

Without TRL there (or at --trl_path) the script prints its header and exits with code 2
before any work; --rlhf_only times rlhf's side alone.

--use_peft adds LoRA rows (issue 14): `rlhf ppo --use_peft`, `rlhf ppo --use_peft --share_base`
(the reward model an adapter on the policy's base from one `rm train --use_peft` step, kept
unmerged, and the critic a trained copy of it: one copy of the base weights) and TRL's PPOTrainer with a
peft LoraConfig (ref_model=None: the policy with its adapter disabled is the reference),
both r 16, alpha 32, dropout 0.05, all-linear, beside the full fine-tuning rows (TRL +
PEFT needs `peft` importable next to TRL; `pyenv/bin/pip install peft`).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from cpu import describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RLHF = os.path.join(ROOT, "target", "release", "rlhf")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer.json")
TRL_PATH = os.path.join("bench", "trl-0.19")  # relative to the project root
SHAPES = {"tiny": ("tiny", 8192), "gpt2": ("gpt2", 50257)}
PROMPTS, PROMPT_TOKENS, NEW, MINI = 16, 32, 64, 4
WORDS = "the cat sat on mat alice has three apples and bob two together they five once upon a time".split()
TRL_CHECK = "import trl, transformers; from trl import PPOTrainer; print(trl.__version__, transformers.__version__)"


LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}


def trl_side(policy, rm, prompts_file, iterations, out, result, use_peft="0"):
    """The TRL child process: writes {"train_seconds"} (its whole trainer.train())."""
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
                    dataloader_num_workers=0,
                    # OnPolicyConfig turns bf16 on when left unset (bf16=None -> True):
                    # before session 11 TRL's side ran bf16 autocast here, not f32.
                    bf16=False, fp16=False)
    peft = {}
    if use_peft == "1":
        from peft import LoraConfig
        peft = {"peft_config": LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                          target_modules=LORA["targets"], task_type="CAUSAL_LM")}
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(policy),
                         ref_model=None if peft else AutoModelForCausalLM.from_pretrained(policy), **peft,
                         reward_model=AutoModelForSequenceClassification.from_pretrained(rm),
                         value_model=AutoModelForSequenceClassification.from_pretrained(rm),
                         train_dataset=ds, eval_dataset=ds)
    assert not trainer.args.bf16 and not trainer.args.fp16, "not plain f32"
    t = time.perf_counter()
    trainer.train()
    with open(result, "w") as f:
        json.dump({"train_seconds": time.perf_counter() - t}, f)


def run_measured(cmd, env, log):
    """Runs `cmd` to the end, stdout and stderr into the file `log`. Returns (wall
    seconds from outside, peak RSS in MB of that process alone, exit code, output)."""
    with open(log, "w+") as f:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        f.seek(0)
        return wall, usage.ru_maxrss / 1024, p.returncode, f.read()


def trl_versions(trl_path):
    """(trl, transformers) versions importable from trl_path, or None."""
    if not os.path.isdir(trl_path):
        return None
    env = dict(os.environ, PYTHONPATH=trl_path)
    r = subprocess.run([sys.executable, "-c", TRL_CHECK], capture_output=True, text=True, env=env)
    return r.stdout.split() if r.returncode == 0 else None


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--trl":
        trl_side(*sys.argv[2:5], int(sys.argv[5]), *sys.argv[6:9])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny", choices=SHAPES)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--trl_path", default=TRL_PATH,
                    help=f"site folder holding trl<=0.19 and transformers 4.x (default: {TRL_PATH}, under the project)")
    ap.add_argument("--rlhf_only", action="store_true", help="time rlhf's side alone, without TRL")
    ap.add_argument("--use_peft", action="store_true", help="add LoRA rows: rlhf --use_peft and TRL with a LoraConfig")
    a = ap.parse_args()
    trl_path = a.trl_path if os.path.isabs(a.trl_path) else os.path.join(ROOT, a.trl_path)
    shown = a.trl_path  # as given: project-relative by default
    preset, vocab = SHAPES[a.shape]

    print(f"PPO, {a.shape}: {PROMPTS} prompts x {NEW} new tokens, 1 PPO epoch, {PROMPTS // MINI} minibatches, "
          f"{a.iterations} iterations, f32, 2 threads")
    print(describe())
    print("compared: wall time of each side's whole training call (rlhf train(), TRL trainer.train()), "
          "and of each side's whole process")
    versions = None
    if not a.rlhf_only:
        versions = trl_versions(trl_path)
        if versions is None:
            print(f"\nTRL's PPOTrainer is not importable from {shown}: install it there "
                  f"(see the top of {os.path.relpath(__file__, ROOT)}), give --trl_path, or --rlhf_only")
            return 2
        print(f"TRL {versions[0]}, transformers {versions[1]} (from {shown})")
    sys.stdout.flush()

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

        env = dict(os.environ, RAYON_NUM_THREADS="2")

        def rlhf_run(name, extra, reward_model=rm):
            out = os.path.join(tmp, name)
            cmd = [RLHF, "ppo", "--model", policy, "--reward_model", reward_model, "--data", prompts, "--output_dir", out,
                   "--rollout_batch_size", str(PROMPTS), "--mini_batch_size", str(MINI), "--ppo_epochs", "1",
                   "--max_new_tokens", str(NEW), "--num_iterations", str(a.iterations), "--logging_steps", "1",
                   "--save_steps", "0"] + extra
            wall, rss, code, log = run_measured(cmd, env, os.path.join(tmp, f"{name}.log"))
            if code != 0:
                print(log[-3000:])
                raise SystemExit("rlhf ppo failed")
            m = re.search(r"^ppo: \d+ steps(?: \(resumed at \d+\))? in ([0-9.]+) s,", log, re.M)
            if m is None:
                print(log[-3000:])
                raise SystemExit("rlhf ppo did not report its training time")
            r = {"train_seconds": float(m.group(1)), "process_seconds": wall, "peak_rss_mb": rss}
            iters = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if "objective/scores" in l]
            r["split"] = {k: sum(it[k] for it in iters) / len(iters)
                          for k in ["time/rollout", "time/scoring", "time/update"]}
            return r

        def trl_run(use_peft):
            result = os.path.join(tmp, f"trl-{use_peft}.json")
            tenv = dict(os.environ, PYTHONPATH=trl_path, TOKENIZERS_PARALLELISM="false")
            wall, rss, code, log = run_measured(
                [sys.executable, os.path.abspath(__file__), "--trl", policy, rm, prompts, str(a.iterations),
                 os.path.join(tmp, f"trl-{use_peft}"), result, "1" if use_peft else "0"], tenv,
                os.path.join(tmp, f"trl-{use_peft}.log"))
            if code != 0:
                print(log[-3000:])
                raise SystemExit("TRL side failed")
            return dict(json.load(open(result)), process_seconds=wall, peak_rss_mb=rss)

        lora_flags = ["--use_peft", "--lora_r", str(LORA["r"]), "--lora_alpha", str(LORA["alpha"]),
                      "--lora_dropout", str(LORA["dropout"]), "--lora_target_modules", LORA["targets"]]
        rows = [("rlhf", rlhf_run("out", []))]
        if a.use_peft:
            rows.append(("rlhf LoRA", rlhf_run("out-lora", lora_flags)))
            # --share_base: the reward model trained as an adapter on the policy's base
            # (one `rm train --use_peft` step), the critic a trained copy of it.
            rm_lora = os.path.join(tmp, "rm-lora")
            subprocess.run([RLHF, "rm", "train", "--model", policy, "--data", ranks, "--output_dir", rm_lora,
                            "--max_steps", "1"] + lora_flags, check=True, capture_output=True)
            rows.append(("rlhf LoRA shared", rlhf_run("out-lora-shared", lora_flags + ["--share_base"], rm_lora)))
        if not a.rlhf_only:
            rows.append(("TRL PPOTrainer", trl_run(False)))
            if a.use_peft:
                rows.append(("TRL + PEFT", trl_run(True)))
        ours = rows[0][1]
        split = ours["split"]
        theirs = dict(rows).get("TRL PPOTrainer")

    n = a.iterations
    print(f"\n{'':<18}{'training call s':>16}{'s/iteration':>13}{'whole process s':>17}{'peak RSS':>12}")
    for name, r in rows:
        print(f"{name:<18}{r['train_seconds']:>16.2f}{r['train_seconds'] / n:>13.2f}{r['process_seconds']:>17.2f}"
              f"{r['peak_rss_mb']:>9.0f} MB")
    if theirs:
        print(f"speed ratio (TRL / rlhf): training call {theirs['train_seconds'] / ours['train_seconds']:.2f}x, "
              f"whole process {theirs['process_seconds'] / ours['process_seconds']:.2f}x; "
              f"memory ratio (rlhf / TRL) {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}")
    if theirs:
        for name, r in rows:
            print(f"peak RSS {name} / TRL PPOTrainer (full): {r['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}")
    print(f"rlhf's own split per iteration (its metrics; not compared): rollout {split['time/rollout']:.2f}, "
          f"scoring {split['time/scoring']:.2f}, update {split['time/update']:.2f} s "
          f"(sum {sum(split.values()):.2f} of {ours['train_seconds'] / n:.2f} s/iteration)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
