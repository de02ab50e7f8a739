#!/usr/bin/env python3
"""`rlhf demo` over several seeds: each seed's figures, their mean and the worst, and
whether every seed meets the full run's thresholds. Standard library only.

    cargo build --release
    python3 bench/demo_seeds.py                      # full runs, seeds 0 1 2
    python3 bench/demo_seeds.py --quick --seeds 0 1  # smaller runs

Each seed runs as its own `rlhf demo` process into runs/demo-seeds/seed-S (a rerun
reuses finished stages; delete the folder to start over). Times are each process's
own `elapsed_s.total` (the whole pipeline, wall clock), measured on the CPU the
report names: a figure from one kind of CPU is no claim about another.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, path in report.json, True when higher is better); the families' rows are
# added from the reports (each task has its own).
ROWS = [
    ("win rate vs SFT (PPO)", ("ppo", "win_rate_vs_sft"), True),
    ("win rate vs SFT (EMA)", ("ema", "win_rate_vs_sft"), True),
    ("gold score SFT", ("sft", "gold_score"), True),
    ("gold score PPO", ("ppo", "gold_score"), True),
    ("RM val accuracy", ("rm_val_accuracy",), True),
    ("KL to SFT, eval prompts (PPO)", ("ppo", "kl_to_sft_eval"), False),
    ("KL, last training iteration", ("ppo_kl_last_training_iteration",), False),
    ("ptx loss held-out SFT", ("sft", "ptx_loss_held_out"), False),
    ("ptx loss held-out PPO", ("ppo", "ptx_loss_held_out"), False),
    ("distinct answers SFT", ("sft", "distinct_answers"), True),
    ("distinct answers PPO", ("ppo", "distinct_answers"), True),
    ("elapsed s", ("elapsed_s", "total"), False),
]


def family_rows(report):
    rows = []
    for fam in report["family_counts"]:
        for who in ("sft", "ppo"):
            rows.append((f"  {fam} {who.upper()}", (who, "families", fam), True))
    return rows


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
    head = f"{'':32}" + "".join(f"{'seed ' + str(s):>10}" for s in args.seeds) + f"{'mean':>10}{'worst':>10}"
    print(head)
    rows = ROWS[:4] + family_rows(reports[0]) + ROWS[4:]
    for label, path, higher in rows:
        vals = [get(r, path) for r in reports]
        if any(v is None for v in vals):
            continue
        mean = sum(vals) / len(vals)
        worst = min(vals) if higher else max(vals)
        print(f"{label:32}" + "".join(f"{v:>10.3f}" for v in vals) + f"{mean:>10.3f}{worst:>10.3f}")
    for r in reports:
        t = r["thresholds"]
        print(
            f"seed {r['seed']}: thresholds {'met' if t['all'] else 'NOT met'} "
            f"(win {t['win_rate']}, rm {t['rm_accuracy']}, families worse {t['families_worse']}, ptx {t['ptx_loss']})"
        )
        for who in ("sft", "ppo"):
            print(f"  {who} end tokens (sampled): {r[who]['end_tokens_sampled']}")


if __name__ == "__main__":
    main()
