#!/usr/bin/env python3
"""`rlhf demo` over several seeds: each seed's figures for every method (SFT, PPO,
PPO-EMA, DPO, GRPO, RLOO), their mean and the worst, and whether every seed meets
the full run's thresholds (PPO). Standard library only.

    cargo build --release
    python3 bench/demo_seeds.py                      # full runs, seeds 0 1 2
    python3 bench/demo_seeds.py --quick --seeds 0 1  # smaller runs

Each seed runs as its own `rlhf demo` process into runs/demo-seeds/seed-S (a rerun
reuses finished stages; delete the folder to start over). `rlhf demo --seeds 0,1,2`
does the same in one process and writes summary.html (the seeds' mean and range per
method and family, with charts); this script prints every seed's column instead. Times are each process's
own `elapsed_s.total` (the whole pipeline, wall clock), measured on the CPU the
report names: a figure from one kind of CPU is no claim about another.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, path in a policy's entry of report.json, True when higher is better).
POLICY_ROWS = [
    ("gold score", ("gold_score",), True),
    ("win rate vs SFT", ("win_rate_vs_sft",), True),
    ("KL to SFT, eval prompts", ("kl_to_sft_eval",), False),
    ("ptx loss held-out", ("ptx_loss_held_out",), False),
    ("distinct answers", ("distinct_answers",), True),
]
RUN_ROWS = [
    ("RM val accuracy", ("rm_val_accuracy",), True),
    ("KL, last PPO iteration", ("ppo_kl_last_training_iteration",), False),
    ("elapsed s (whole demo)", ("elapsed_s", "total"), False),
]
ORDER = ["sft", "ppo", "ppo-ema", "dpo", "grpo", "rloo"]


def rows_for(report):
    rows = []
    for who in [w for w in ORDER if w in report["policies"]]:
        for label, path, higher in POLICY_ROWS:
            if who == "sft" and path[0] in ("win_rate_vs_sft", "kl_to_sft_eval"):
                continue
            rows.append((f"{who}: {label}", ("policies", who) + path, higher))
        for fam in report["family_counts"]:
            rows.append((f"{who}:   {fam}", ("policies", who, "families", fam), True))
        stage = who.replace("-ema", "")
        if who != "sft":
            rows.append((f"{who}: train s", ("elapsed_s", stage), False))
            rows.append((f"{who}: peak RSS MiB", ("peak_rss_mib", stage, "peak_mib"), False))
    return rows + RUN_ROWS


def get(report, path):
    v = report
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--task", default=None, help="passed to rlhf demo --task")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "demo-seeds"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "rlhf"))
    args = ap.parse_args()

    reports = []
    for seed in args.seeds:
        name = f"{args.task or '3h'}-{'quick' if args.quick else 'full'}-seed-{seed}"
        out = os.path.join(args.out, name)
        cmd = [args.bin, "demo", "--seed", str(seed), "--output_dir", out]
        if args.quick:
            cmd.append("--quick")
        if args.task:
            cmd += ["--task", args.task]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        with open(os.path.join(out, "report.json")) as f:
            reports.append(json.load(f))

    print(f"\nCPU: {reports[0].get('cpu')}")
    print(f"task: {args.task or '3h'}, {'quick' if args.quick else 'full'} run, seeds {args.seeds}\n")
    head = f"{'':40}" + "".join(f"{'seed ' + str(s):>10}" for s in args.seeds) + f"{'mean':>10}{'worst':>10}"
    print(head)
    for label, path, higher in rows_for(reports[0]):
        vals = [get(r, path) for r in reports]
        if any(v is None for v in vals):
            continue
        mean = sum(vals) / len(vals)
        worst = min(vals) if higher else max(vals)
        print(f"{label:40}" + "".join(f"{v:>10.3f}" for v in vals) + f"{mean:>10.3f}{worst:>10.3f}")
    for r in reports:
        t = r.get("thresholds")
        if t:
            print(
                f"seed {r['seed']}: PPO thresholds {'met' if t['all'] else 'NOT met'} "
                f"(win {t['win_rate']}, rm {t['rm_accuracy']}, families worse {t['families_worse']}, ptx {t['ptx_loss']})"
            )
        for who in [w for w in ORDER if w in r["policies"]]:
            print(f"  {who} end tokens (sampled): {r['policies'][who]['end_tokens_sampled']}")


if __name__ == "__main__":
    main()
