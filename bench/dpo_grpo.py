#!/usr/bin/env python3
"""DPO and GRPO training time and peak memory: `rlhf dpo` and `rlhf grpo` against TRL
1.x's DPOTrainer and GRPOTrainer on the same model folders, data and machine, in the
same run. f32, 2 threads, no evaluation; random GPT-2 policy (from `rlhf init`).

DPO: N = steps x 8 {"prompt", "chosen", "rejected"} rows of plain text (24-word
prompts, 24-word responses), 8 pairs per optimizer step, one pass, beta 0.1, sigmoid
loss, learning rate 1e-6 linear to 0, no warmup, clipping at 1.0, max_length 128 (no
row is truncated). Both sides compute the reference log-probs once before training
from the same folder and then keep no reference model (TRL: precompute_ref_log_probs,
which TRL 1.x runs in the trainer's constructor, outside train(); rlhf: DpoTask::new,
outside train()).

GRPO: per iteration 4 prompts x G=4 generations = 16 responses of 64 new tokens
(sampling at temperature 1, top-k/top-p off, stop at eos), 4 updates of 4 responses
(TRL: per_device_train_batch_size 4, steps_per_generation 4, so TRL computes the old
log-probs as rlhf does), mu = 1 pass, epsilon 0.2, beta 0.04 (so both sides hold and
run a reference model), scale_rewards "group", token-level loss over the minibatch
(TRL loss_type "bnpo", which is rlhf's normalisation), learning rate 1e-6 linear,
clipping at 1.0. The reward is one reward model folder from one `rlhf rm train` step,
read by TRL as an AutoModelForSequenceClassification reward function.

What is compared: wall time to wall time, twice.
  - The training call: rlhf's `train()` (what `rlhf dpo` / `rlhf grpo` report as "N
    steps in S s": the whole loop, for GRPO rollouts, scoring and updates included,
    and the final checkpoint, optimizer state included, and model it writes) against
    TRL's `trainer.train()` (which writes nothing: save_strategy "no"). Model loading,
    tokenisation and DPO's reference pass are outside both. This is the headline ratio.
  - The whole process: `rlhf dpo` / `rlhf grpo` against the TRL child process
    (interpreter start, imports, model loading, trainer setup, train()), timed from
    outside.
Peak RSS: each process's own high-water mark (os.wait4).

Differences that remain (each side as it ships):
  - TRL's configs default to bf16=True and gradient_checkpointing=True; both are set
    False here (rlhf trains in f32 without checkpointing). dropout: the folders' GPT-2
    config leaves transformers' 0.1 defaults, so disable_dropout=True on TRL's side
    (rlhf has no dropout).
  - rlhf writes a final checkpoint (model + AdamW state) and the model inside its
    training call; TRL writes nothing.
  - DPO: the same text, tokenised by each side (prompt with special tokens, then the
    response and eos: same rule on both). Batch order is each side's own shuffle.
  - GRPO: the samples differ (each side's RNG), so sequence lengths may differ if a
    response stops at eos early (rare with a random model: usually all 64 tokens).
    The reward model reads prompt + response + eos in rlhf (its RewardInput rule), the
    decoded prompt + completion text re-tokenised, right-padded, no eos added, in TRL.
    rlhf computes the sampling policy's entropy in its old-log-prob pass; TRL computes
    entropy in every training forward instead (compute_entropy=True), and in DPO its
    entropy and token-accuracy metrics. rlhf's prompts are picked in its PromptSet
    order, TRL's by its RepeatSampler.
  - Logging every step on both sides (TRL logging_steps=1, rlhf --logging_steps 1).
  - Setup only: datasets cannot fingerprint Arrow tables in this environment, so the
    TRL child pickles them as Arrow IPC bytes for hashing (patch_arrow_hashing).

Install TRL 1.x into bench/trl-1 (ignored by git) without touching torch/transformers:

    pyenv/bin/python -m pip install --target bench/trl-1 --no-deps trl==1.16.0 accelerate==1.15.0 \\
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pandas==3.1.1 psutil==7.2.2 pyarrow==24.0.0 \\
        python-dateutil==4.0.0 tzdata==2026.6 xxhash==4.1.0
    pyenv/bin/python bench/dpo_grpo.py --shape tiny --wait_quiet
    pyenv/bin/python bench/dpo_grpo.py --shape gpt2 --dpo_steps 8 --grpo_iterations 2 --wait_quiet

Without TRL there (or at --trl_path) the script prints its header and exits with code 2
before any work; --rlhf_only times rlhf's side alone.
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
TRL_PATH = os.path.join("bench", "trl-1")  # relative to the project root
SHAPES = {"tiny": ("tiny", 8192), "gpt2": ("gpt2", 50257)}
WORDS = "the cat sat on mat alice has three apples and bob two together they five once upon a time".split()
TRL_CHECK = ("import trl, transformers, torch; from trl import DPOTrainer, GRPOTrainer; "
             "print(trl.__version__, transformers.__version__, torch.__version__)")

# DPO
DPO_BATCH, DPO_PROMPT_WORDS, DPO_RESPONSE_WORDS, DPO_MAX_LENGTH, DPO_BETA = 8, 24, 24, 128, 0.1
# GRPO
PROMPTS, GENERATIONS, MINI, NEW, PROMPT_WORDS, GRPO_BETA, EPSILON = 4, 4, 4, 64, 32, 0.04, 0.2
LR = 1e-6


def words(i, n, stride):
    return " ".join(WORDS[(i * stride + j * 3 + j * j) % len(WORDS)] for j in range(n))


def _table_from_ipc(data):
    import pyarrow as pa
    return pa.ipc.open_stream(data).read_all()


def patch_arrow_hashing():
    """datasets fingerprints every Dataset by pickling its Arrow table with dill; in this
    environment (pyarrow 24-26 built with Cython 3.2, dill 0.3.8-0.4.1, Python 3.11.7) that
    fails on pyarrow.lib.chunked_array ("Can't pickle <class 'MonthDayNano'>"), so
    Dataset.from_dict raises. Tables are pickled as their Arrow IPC stream instead: setup
    only (fingerprints), nothing inside train()."""
    import pyarrow as pa
    from datasets.utils._dill import pklregister

    @pklregister(pa.Table)
    def save_table(pickler, obj):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, obj.schema) as w:
            w.write_table(obj)
        pickler.save_reduce(_table_from_ipc, (sink.getvalue().to_pybytes(),), obj=obj)


def trl_side(kind, s):
    """The TRL child process: writes {"train_seconds", "setup_seconds"} to s["result"]."""
    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast
    torch.set_num_threads(2)
    patch_arrow_hashing()
    tok = PreTrainedTokenizerFast.from_pretrained(s["policy"])
    rows = [json.loads(l) for l in open(s["data"])]
    common = dict(output_dir=s["out"], gradient_accumulation_steps=1, max_steps=s["max_steps"],
                  learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
                  weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                  bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True,
                  report_to=[], save_strategy="no", eval_strategy="no", logging_steps=1, use_cpu=True,
                  seed=0, dataloader_num_workers=0)
    policy = AutoModelForCausalLM.from_pretrained(s["policy"], dtype=torch.float32)
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer
        ds = Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")})
        cfg = DPOConfig(per_device_train_batch_size=DPO_BATCH, beta=DPO_BETA, loss_type=["sigmoid"],
                        max_length=DPO_MAX_LENGTH, precompute_ref_log_probs=True, **common)
        trainer = DPOTrainer(model=policy, args=cfg, processing_class=tok, train_dataset=ds)
    else:
        from trl import GRPOConfig, GRPOTrainer
        ds = Dataset.from_dict({"prompt": [r["prompt"] for r in rows]})
        rm = AutoModelForSequenceClassification.from_pretrained(s["rm"], num_labels=1, dtype=torch.float32)
        rm_tok = PreTrainedTokenizerFast.from_pretrained(s["rm"])
        cfg = GRPOConfig(per_device_train_batch_size=MINI, steps_per_generation=PROMPTS * GENERATIONS // MINI,
                         num_generations=GENERATIONS, max_completion_length=NEW, temperature=1.0, top_p=1.0,
                         top_k=0, num_iterations=1, epsilon=EPSILON, beta=GRPO_BETA, scale_rewards="group",
                         loss_type="bnpo", **common)
        trainer = GRPOTrainer(model=policy, reward_funcs=rm, args=cfg, train_dataset=ds,
                              processing_class=tok, reward_processing_classes=rm_tok)
    m = trainer.model
    checkpointing = getattr(m, "is_activation_checkpointing", None)
    checkpointing = checkpointing if checkpointing is not None else m.is_gradient_checkpointing
    assert not trainer.args.bf16 and not trainer.args.fp16 and not checkpointing, "not plain f32"
    assert all(p.dtype == torch.float32 for p in m.parameters()), "not f32"
    assert torch.get_num_threads() == 2
    t1 = time.perf_counter()
    out = trainer.train()
    t2 = time.perf_counter()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    with open(s["result"], "w") as f:
        json.dump({"train_seconds": t2 - t1, "setup_seconds": t1 - t0, "global_step": out.global_step,
                   "mean_length": sum(lengths) / len(lengths) if lengths else None}, f)


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
    """(trl, transformers, torch) versions importable from trl_path, or None."""
    if not os.path.isdir(trl_path):
        return None
    env = dict(os.environ, PYTHONPATH=trl_path)
    r = subprocess.run([sys.executable, "-c", TRL_CHECK], capture_output=True, text=True, env=env)
    return r.stdout.split() if r.returncode == 0 else None


def load1():
    return os.getloadavg()[0]


def wait_quiet(limit, max_wait):
    """Polls the 1-minute load average every 30 s until it is below `limit` or
    `max_wait` seconds have passed. Returns the load it started at."""
    t = time.time()
    while load1() >= limit and time.time() - t < max_wait:
        print(f"  load {load1():.2f} >= {limit}: waiting", flush=True)
        time.sleep(30)
    return load1()


def rlhf_mean_length(out):
    """rlhf grpo's mean response length over its iterations (metrics.jsonl)."""
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    lengths = [r["completions/mean_length"] for r in rows if "completions/mean_length" in r]
    return sum(lengths) / len(lengths) if lengths else None


def rlhf_run(stage, cmd, tmp):
    env = dict(os.environ, RAYON_NUM_THREADS="2")
    wall, rss, code, log = run_measured(cmd, env, os.path.join(tmp, f"rlhf-{stage}.log"))
    if code != 0:
        print(log[-3000:])
        raise SystemExit(f"rlhf {stage} failed")
    m = re.search(rf"^{stage}: (\d+) steps(?: \(resumed at \d+\))? in ([0-9.]+) s,", log, re.M)
    if m is None:
        print(log[-3000:])
        raise SystemExit(f"rlhf {stage} did not report its training time")
    return {"steps": int(m.group(1)), "train_seconds": float(m.group(2)), "process_seconds": wall,
            "peak_rss_mb": rss}


def trl_run(kind, settings, trl_path, tmp):
    settings = dict(settings, result=os.path.join(tmp, f"trl-{kind}.json"), out=os.path.join(tmp, f"trl-{kind}"))
    env = dict(os.environ, PYTHONPATH=trl_path, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    wall, rss, code, log = run_measured(
        [sys.executable, os.path.abspath(__file__), "--trl", kind, json.dumps(settings)], env,
        os.path.join(tmp, f"trl-{kind}.log"))
    if code != 0:
        print(log[-3000:])
        raise SystemExit(f"TRL {kind} side failed")
    r = json.load(open(settings["result"]))
    return dict(r, steps=r["global_step"], process_seconds=wall, peak_rss_mb=rss)


def table(title, unit_name, units, ours, theirs, peer):
    print(f"\n{title}")
    print(f"{'':<20}{'steps':>6}{'training call s':>17}{unit_name:>14}{'whole process s':>17}{'peak RSS':>12}")
    for name, r in [("rlhf", ours)] + ([(peer, theirs)] if theirs else []):
        print(f"{name:<20}{r['steps']:>6}{r['train_seconds']:>17.2f}{r['train_seconds'] / units:>14.3f}"
              f"{r['process_seconds']:>17.2f}{r['peak_rss_mb']:>9.0f} MB")
    if theirs:
        print(f"speed ratio (TRL / rlhf): training call {theirs['train_seconds'] / ours['train_seconds']:.2f}x, "
              f"whole process {theirs['process_seconds'] / ours['process_seconds']:.2f}x; "
              f"memory ratio (rlhf / TRL) {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}")
        print(f"outside the training call (setup, loading, exit; not compared): rlhf "
              f"{ours['process_seconds'] - ours['train_seconds']:.2f} s, TRL "
              f"{theirs['process_seconds'] - theirs['train_seconds']:.2f} s "
              f"(of which before train() in the child: {theirs['setup_seconds']:.2f} s)")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--trl":
        trl_side(sys.argv[2], json.loads(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny", choices=SHAPES)
    ap.add_argument("--dpo_steps", type=int, default=32, help=f"optimizer steps of {DPO_BATCH} pairs (one pass)")
    ap.add_argument("--grpo_iterations", type=int, default=3,
                    help=f"iterations of {PROMPTS}x{GENERATIONS} responses, {PROMPTS * GENERATIONS // MINI} updates each")
    ap.add_argument("--only", choices=["dpo", "grpo"], help="run one method only")
    ap.add_argument("--trl_path", default=TRL_PATH,
                    help=f"site folder holding trl 1.x (default: {TRL_PATH}, under the project)")
    ap.add_argument("--rlhf_only", action="store_true", help="time rlhf's side alone, without TRL")
    ap.add_argument("--wait_quiet", action="store_true",
                    help="before measuring, wait (up to 25 min) for the 1-minute load average to drop below 1.5")
    a = ap.parse_args()
    trl_path = a.trl_path if os.path.isabs(a.trl_path) else os.path.join(ROOT, a.trl_path)
    shown = a.trl_path
    preset, vocab = SHAPES[a.shape]
    methods = [a.only] if a.only else ["dpo", "grpo"]

    print(f"DPO and GRPO, {a.shape}, f32, 2 threads")
    if "dpo" in methods:
        print(f"  DPO: {a.dpo_steps} steps x {DPO_BATCH} pairs (24-word prompt, 24-word responses), one pass, "
              f"beta {DPO_BETA}, sigmoid, lr {LR} linear, max_length {DPO_MAX_LENGTH}, reference log-probs precomputed")
    if "grpo" in methods:
        print(f"  GRPO: {a.grpo_iterations} iterations x {PROMPTS} prompts x G={GENERATIONS} x {NEW} new tokens, "
              f"{PROMPTS * GENERATIONS // MINI} updates of {MINI}, mu 1, epsilon {EPSILON}, beta {GRPO_BETA}, "
              f"lr {LR} linear, reward model from one `rlhf rm train` step")
    print(describe())
    print("compared: wall time of each side's whole training call (rlhf train(), TRL trainer.train()), "
          "and of each side's whole process")
    if not a.rlhf_only:
        versions = trl_versions(trl_path)
        if versions is None:
            print(f"\nTRL 1.x's DPOTrainer/GRPOTrainer are not importable from {shown}: install them there "
                  f"(see the top of {os.path.relpath(__file__, ROOT)}), give --trl_path, or --rlhf_only")
            return 2
        print(f"TRL {versions[0]}, transformers {versions[1]}, torch {versions[2]} (from {shown})")
    sys.stdout.flush()

    subprocess.run(["cargo", "build", "--release", "--bin", "rlhf"], cwd=ROOT, check=True)
    if a.wait_quiet:
        wait_quiet(1.5, 25 * 60)
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        policy, rm = os.path.join(tmp, "policy"), os.path.join(tmp, "rm")
        subprocess.run([RLHF, "init", "--arch", "gpt2", "--preset", preset, "--tokenizer", TOKENIZER,
                        "--vocab_size", str(vocab), "--output_dir", policy], check=True, capture_output=True)
        cmds = []
        if "dpo" in methods:
            pairs = os.path.join(tmp, "pairs.jsonl")
            with open(pairs, "w") as f:
                for i in range(a.dpo_steps * DPO_BATCH):
                    f.write(json.dumps({"prompt": words(i, DPO_PROMPT_WORDS, 7),
                                        "chosen": " " + words(i, DPO_RESPONSE_WORDS, 5),
                                        "rejected": " no " + words(i, DPO_RESPONSE_WORDS - 1, 11)}) + "\n")
            out = os.path.join(tmp, "rlhf-dpo")
            cmd = [RLHF, "dpo", "--model", policy, "--data", pairs, "--output_dir", out,
                   "--prompts_per_batch", str(DPO_BATCH), "--max_steps", str(a.dpo_steps), "--num_train_epochs", "1",
                   "--beta", str(DPO_BETA), "--loss_type", "sigmoid", "--max_length", str(DPO_MAX_LENGTH),
                   "--learning_rate", str(LR), "--lr_scheduler_type", "linear", "--max_grad_norm", "1",
                   "--logging_steps", "1", "--save_steps", "0"]
            cmds.append(cmd)
            ours = rlhf_run("dpo", cmd, tmp)
            theirs = None if a.rlhf_only else trl_run(
                "dpo", {"policy": policy, "data": pairs, "max_steps": a.dpo_steps}, trl_path, tmp)
            results["dpo"] = (ours, theirs)
        if "grpo" in methods:
            ranks = os.path.join(tmp, "ranks.jsonl")
            with open(ranks, "w") as f:
                f.write(json.dumps({"prompt": "the cat", "chosen": "sat on the mat", "rejected": "no"}) + "\n")
            subprocess.run([RLHF, "rm", "train", "--model", policy, "--data", ranks, "--output_dir", rm,
                            "--max_steps", "1"], check=True, capture_output=True)
            prompts = os.path.join(tmp, "prompts.jsonl")
            with open(prompts, "w") as f:
                for i in range(PROMPTS * a.grpo_iterations):
                    f.write(json.dumps({"prompt": words(i, PROMPT_WORDS, 7)}) + "\n")
            out = os.path.join(tmp, "rlhf-grpo")
            cmd = [RLHF, "grpo", "--model", policy, "--reward_model", rm, "--data", prompts, "--output_dir", out,
                   "--rollout_batch_size", str(PROMPTS), "--num_generations", str(GENERATIONS),
                   "--mini_batch_size", str(MINI), "--num_iterations", "1",
                   "--max_iterations", str(a.grpo_iterations), "--max_completion_length", str(NEW),
                   "--temperature", "1", "--epsilon", str(EPSILON), "--beta", str(GRPO_BETA),
                   "--scale_rewards", "group", "--learning_rate", str(LR), "--lr_scheduler_type", "linear",
                   "--max_grad_norm", "1", "--logging_steps", "1", "--save_steps", "0"]
            cmds.append(cmd)
            ours = dict(rlhf_run("grpo", cmd, tmp), mean_length=rlhf_mean_length(out))
            steps = a.grpo_iterations * PROMPTS * GENERATIONS // MINI
            theirs = None if a.rlhf_only else trl_run(
                "grpo", {"policy": policy, "rm": rm, "data": prompts, "max_steps": steps}, trl_path, tmp)
            results["grpo"] = (ours, theirs)
    load_after = os.getloadavg()

    print("\ncommands (rlhf side; paths are in a temporary folder):")
    for c in cmds:
        print("  " + " ".join(os.path.basename(x) if x == RLHF else x for x in c))
    print(f"load average (1, 5, 15 min) before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; "
          f"after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if "dpo" in results:
        ours, theirs = results["dpo"]
        table(f"DPO, {a.shape} ({a.dpo_steps} steps of {DPO_BATCH} pairs)", "s/step", ours["steps"],
              ours, theirs, "TRL DPOTrainer")
    if "grpo" in results:
        ours, theirs = results["grpo"]
        table(f"GRPO, {a.shape} ({a.grpo_iterations} iterations of {PROMPTS * GENERATIONS} responses, "
              f"{PROMPTS * GENERATIONS // MINI} updates each)", "s/iteration", a.grpo_iterations,
              ours, theirs, "TRL GRPOTrainer")
        print(f"mean response length (tokens; the work depends on it): rlhf {ours['mean_length']:.1f}"
              + (f", TRL {theirs['mean_length']:.1f}" if theirs and theirs["mean_length"] is not None else ""))
    for m, (ours, theirs) in results.items():
        if theirs and theirs["steps"] != ours["steps"]:
            print(f"WARNING: {m}: rlhf ran {ours['steps']} steps, TRL {theirs['steps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
