"""The quickstart on several seeds, against an SFT-only control given the same time.

For each seed it runs `configs/quickstart.yaml` (SFT warm-start, then LOOP), then the
control: the same recipe with no RL, its SFT continued for the RL run's whole training
time (SFT + RL seconds). It prints held-out success (sampled and greedy) of the
warm-started, RL-trained and SFT-continued policies, the RL gain in points, and the
ratio RL / control. Runs go two at a time, one torch thread each (2-core machine).

    python bench/quickstart_seeds.py [--seeds 0 1 2] [--jobs 2] [key=value ...]
    python bench/quickstart_seeds.py --config configs/grpo/calc_tiny_full_cpu.yaml --no-control
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"


def run(name: str, out: Path, overrides: list[str], config: Path = CONFIG) -> dict:
    cmd = [sys.executable, "-m", "looprl.cli", "train", str(config), f"name={name}",
           f"output_dir={out}", "progress=false", "threads=1", *overrides]
    start = time.perf_counter()
    log = out / f"{name}.log"
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        raise RuntimeError(f"{name} failed (exit {code}); see {log}")
    results = json.loads((out / name / "results.json").read_text())
    results["wall_s"] = time.perf_counter() - start
    return results


def rate(results: dict, tag: str, mode: str) -> float:
    return results[tag][mode]["success_rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_quickstart"))
    parser.add_argument("--config", default=str(CONFIG), help="recipe to run (default: the quickstart)")
    parser.add_argument("--no-control", action="store_true", help="skip the SFT-only control runs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def seed_pair(seed: int) -> tuple[dict, dict]:
        """The LOOP run, then its control with the same training time."""
        rl = run(f"rl_seed{seed}", out, [f"seed={seed}", *args.overrides], Path(args.config))
        if args.no_control:
            return rl, None
        budget = rl["sft"]["seconds"] + rl["rl"]["seconds"]
        control = run(f"sft_seed{seed}", out, [f"seed={seed}", *args.overrides, "train.steps=0",
                                               "eval.before_rl=false", "sft.steps=1000000",
                                               f"sft.max_seconds={budget:.1f}"], Path(args.config))
        return rl, control

    with ThreadPoolExecutor(args.jobs) as pool:
        pairs = dict(zip(args.seeds, pool.map(seed_pair, args.seeds)))
    rl = {seed: pair[0] for seed, pair in pairs.items()}
    ctrl = {seed: pair[1] for seed, pair in pairs.items()}

    rows = []
    for seed in args.seeds:
        r, c = rl[seed], ctrl[seed]
        rows.append({
            "seed": seed,
            "train_s": r["sft"]["seconds"] + r["rl"]["seconds"],
            "rl_steps": r["rl"]["steps"],
            **{f"{tag}_{mode}": rate(res, key, mode) if res else float("nan")
               for tag, res, key in (("warm", r, "warmstart"), ("rl", r, "final"), ("sft_ctrl", c, "final"))
               for mode in ("sampled", "greedy")},
            "sft_ctrl_steps": c["sft"]["steps"] if c else None,
        })
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    print("| seed | train s | warm-start sampled / greedy | RL sampled / greedy | gain (pts, sampled) "
          "| SFT-only control sampled / greedy | RL / control (sampled) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        gain = 100 * (row["rl_sampled"] - row["warm_sampled"])
        ratio = row["rl_sampled"] / max(row["sft_ctrl_sampled"], 1e-9)
        print(f"| {row['seed']} | {row['train_s']:.0f} | {row['warm_sampled']:.1%} / {row['warm_greedy']:.1%} "
              f"| {row['rl_sampled']:.1%} / {row['rl_greedy']:.1%} | {gain:+.1f} "
              f"| {row['sft_ctrl_sampled']:.1%} / {row['sft_ctrl_greedy']:.1%} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
