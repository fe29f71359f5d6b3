"""Asynchronous vs synchronous rollouts: optimizer steps per hour, and held-out success after the same steps.

The environment is `looprl/Calc-v0` behind tool latency (`bench/slow_calc.py`): every `step`
sleeps `--latency` seconds, and one task in five (chosen by its seed) is `--slow`
times slower, so episodes are uneven in length (the policy uses 1 to 3 turns) and in
wall time. For each seed it runs the quickstart recipe (SFT warm-start, then LOOP)
synchronously and with `rollout.mode=async` at each `--staleness`, the same number of
RL steps each, one run at a time, one torch thread. It prints RL steps per hour (RL
wall time only: the warm-start and evaluation are the same for all), the same from the
mean step time after the first step (without the one-off start of Ray and its actors),
held-out sampled success after the last step (evaluated without latency), and the
ratios async / sync.

With `--correction decoupled` (or `recompute`) the async runs train with
`rollout.decoupled_loss=true` (or `rollout.recompute_logprobs=true`). Each async mode's line
ends with its mean paired difference in success from sync and two standard errors of that
mean: the binomial one (evaluation noise of the 300-episode estimates) and the one across
seeds (which also holds each run's training randomness), so "equal within noise" can be
read off.

    python bench/async.py [--seeds 0 1 2] [--steps 30] [--staleness 1 2] [--backend local|ray]
                          [--pin-cpus] [--correction none|recompute|decoupled] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
# Ray rollout actors import the environment's module themselves (`module:EnvId`).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "bench"), os.environ.get("PYTHONPATH")]))

from looprl.config import load_config  # noqa: E402
from looprl.train.trainer import train  # noqa: E402

ENV_ID = "slow_calc:bench/SlowCalc-v0"
CORRECTIONS = {"none": [], "recompute": ["rollout.recompute_logprobs=true"],
               "decoupled": ["rollout.decoupled_loss=true"]}


def run_one(name: str, out: Path, args, overrides: list[str]) -> dict:
    calc = "{min_operand: 1, max_operand: 20, num_operands: 2, operators: '+-*', max_turns: 3}"
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"name={name}", f"output_dir={out}", "progress=false", "threads=1", f"env.id={ENV_ID}",
        f"env.kwargs={calc[:-1]}, latency_s: {args.latency}, slow_factor: {args.slow}}}",
        "eval.env_kwargs={split: test, latency_s: 0.0}", "eval.greedy=false", "eval.before_rl=false",
        f"eval.episodes={args.eval_episodes}", f"train.steps={args.steps}", f"sft.steps={args.sft_steps}",
        f"train.save_every={args.steps}", "rollout.prefix_cache=true", *overrides,
    ])
    results = train(cfg)
    rl = results["rl"]
    return {"steps_per_hour": rl["steps"] / rl["seconds"] * 3600, "rl_s": rl["seconds"],
            "steady_steps_per_hour": steady_steps_per_hour(cfg.run_dir),
            "success": results["final"]["sampled"]["success_rate"]}


def steady_steps_per_hour(run_dir: Path) -> float:
    """Steps per hour from the mean step time (`perf/step_s`) after the first step, i.e.
    without the one-off start (a Ray cluster and its actors, the first weight push)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["perf/step_s"] for r in rows if "perf/step_s" in r][1:]
    return 3600 / statistics.mean(steps)


def paired_difference(success: list[float], baseline: list[float], episodes: int) -> tuple[float, float, float]:
    """Mean per-seed difference `success - baseline` and two standard errors of it.

    - Binomial: each rate is a mean of `episodes` Bernoulli trials, so a seed's difference
      has variance p(1-p)/n + q(1-q)/n (evaluation noise only).
    - Across seeds: the sample standard deviation of the seeds' differences / sqrt(seeds),
      which also holds the training runs' own randomness (NaN with one seed).

    >>> [round(x, 4) for x in paired_difference([0.5, 0.7], [0.6, 0.6], 100)]
    [0.0, 0.0485, 0.1]
    """
    diffs = [a - b for a, b in zip(success, baseline)]
    variance = sum(p * (1 - p) / episodes + q * (1 - q) / episodes for p, q in zip(success, baseline))
    seeds = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), variance ** 0.5 / len(diffs), seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30, help="RL steps per run")
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--eval-episodes", type=int, default=300)
    parser.add_argument("--staleness", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per tool call")
    parser.add_argument("--slow", type=float, default=5.0, help="latency factor of the slow tasks")
    parser.add_argument("--backend", choices=["local", "ray"], default="local",
                        help="where the async runs' producers live (ray: in their own processes)")
    parser.add_argument("--pin-cpus", action="store_true",
                        help="ray: rollout.ray_pin_cpus=true (the trainer on its own core, Ray on the others)")
    parser.add_argument("--correction", choices=list(CORRECTIONS), default="none",
                        help="off-policy correction of the async runs (decoupled: rollout.decoupled_loss=true)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_async"))
    parser.add_argument("--report", action="store_true",
                        help="print the table again from the runs already in --out (their summary.json) without training")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    modes = {"sync": ["rollout.mode=sync"]} | {
        f"async_s{s}": ["rollout.mode=async", f"rollout.max_staleness={s}", f"rollout.backend={args.backend}",
                        *CORRECTIONS[args.correction], *(["rollout.ray_pin_cpus=true"] if args.pin_cpus else [])]
        for s in args.staleness}
    table: dict[str, list[dict]] = {m: [] for m in modes}
    if args.report:
        table = json.loads((out / "summary.json").read_text())["runs"]
        for mode, rows in table.items():
            for seed, row in zip(args.seeds, rows):
                row["steady_steps_per_hour"] = steady_steps_per_hour(out / f"{mode}_seed{seed}")
    for seed in [] if args.report else args.seeds:
        for mode, extra in modes.items():
            row = run_one(f"{mode}_seed{seed}", out, args, [f"seed={seed}", *extra, *args.overrides])
            table[mode].append(row)
            print(f"seed {seed} {mode:>9}: {row['steps_per_hour']:7.0f} steps/h  ({row['rl_s']:.1f} s RL; "
                  f"{row['steady_steps_per_hour']:.0f} steps/h after the first step)  "
                  f"held-out success {row['success']:.1%}", flush=True)
    print(f"\n{len(args.seeds)} seeds, {args.steps} RL steps, tool latency {args.latency} s (x{args.slow} on 1/5 "
          "of tasks); mean (min-max)")
    base = statistics.mean(r["steps_per_hour"] for r in table["sync"])
    steady_base = statistics.mean(r["steady_steps_per_hour"] for r in table["sync"])
    summary = {}
    for mode, rows in table.items():
        rate = [r["steps_per_hour"] for r in rows]
        steady = statistics.mean(r["steady_steps_per_hour"] for r in rows)
        success = [r["success"] for r in rows]
        summary[mode] = {"steps_per_hour": statistics.mean(rate), "ratio": statistics.mean(rate) / base,
                         "steady_steps_per_hour": steady, "steady_ratio": steady / steady_base,
                         "success": statistics.mean(success), "success_min": min(success),
                         "success_max": max(success)}
        diff, stderr, seed_stderr = paired_difference(success, [r["success"] for r in table["sync"]],
                                                      args.eval_episodes)
        summary[mode] |= {"success_diff": diff, "success_diff_stderr": stderr, "success_diff_seed_stderr": seed_stderr}
        print(f"{mode:>9}: {statistics.mean(rate):7.0f} steps/h ({min(rate):.0f}-{max(rate):.0f})  "
              f"x{statistics.mean(rate) / base:.2f} vs sync; after the first step x{steady / steady_base:.2f}  "
              f"held-out success {statistics.mean(success):.1%} ({min(success):.1%}-{max(success):.1%})"
              + ("" if mode == "sync" else f"; vs sync {diff * 100:+.1f} points (s.e. {stderr * 100:.1f} binomial, "
                                           f"{seed_stderr * 100:.1f} across seeds)"))
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "summary": summary, "runs": table}, indent=2))


if __name__ == "__main__":
    main()
