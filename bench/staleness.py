"""What staleness alone costs, without timing noise: the synchronous loop with rollouts
sampled by the weights of `--lag` steps ago.

`bench/async.py` measures the real asynchronous runs, whose batches depend on timing, so
two runs of one seed differ. Here every step's rollouts come from a snapshot of the
policy `--lag` optimizer steps old (as an async run with `max_staleness` = lag whose
producers are always exactly that far ahead), and everything else is the synchronous
loop: a run is bit-reproducible, and lag 0 is the plain synchronous run. For each seed
it trains the quickstart recipe on Calc-v0 with each lag and each off-policy correction
and prints held-out sampled success after the same number of steps.

    python bench/staleness.py [--seeds 0] [--steps 60] [--lags 0 1] \
        [--corrections none decoupled recompute] [key=value ...]

Measured on the quickstart recipe, seed 0, 60 steps (README, "Asynchronous rollouts").
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from looprl.config import load_config  # noqa: E402
from looprl.rollout.weight_sync import SnapshotEngine  # noqa: E402
from looprl.train.policy import trainable_state  # noqa: E402
from looprl.train.recipes.onpolicy import OnPolicy  # noqa: E402
from looprl.train.trainer import train  # noqa: E402
from looprl.train.update import recompute_logprobs  # noqa: E402

# The async runs' fields: what `recompute_logprobs` writes for each correction.
FIELDS = {"none": None, "decoupled": "proximal_logprobs", "recompute": "behaviour_logprobs"}


def lagged_recipe(lag: int, field: str | None) -> type:
    """The on-policy recipe, its rollouts sampled with the weights of `lag` steps ago and,
    before the update, the current weights' logprobs recorded in `field` (as the async
    loop does). Lag 0 without a field is the plain on-policy recipe."""

    class Lagged(OnPolicy):
        def __init__(self, ctx, fresh: bool):
            super().__init__(ctx, fresh)
            self.past: collections.deque = collections.deque()
            self.snapshot: SnapshotEngine | None = None

        def collect(self, ctx, seeds):
            if lag == 0:
                return super().collect(ctx, seeds)
            self.past.append(({k: t.detach().clone() for k, t in trainable_state(ctx.model).items()}, ctx.version))
            if len(self.past) > lag + 1:
                self.past.popleft()
            state, version = self.past[0]  # the oldest kept: `lag` steps old once the run is that far
            if self.snapshot is None:
                self.snapshot = SnapshotEngine(ctx.model, ctx.tokenizer, version,
                                               prefix_cache=ctx.cfg.rollout.prefix_cache)
            self.snapshot.push(state, version)
            return ctx.player(self.snapshot).collect(seeds, ctx.cfg.rollout.group_size)

        def prepare(self, ctx, rows):
            if rows and field is not None:
                rows = recompute_logprobs(ctx.model, ctx.tokenizer.pad_token_id, rows, ctx.cfg.rollout.temperature,
                                          ctx.cfg.algorithm.micro_batch_tokens, field=field)
            return rows

    return Lagged


def run_one(name: str, out: Path, args, lag: int, correction: str, overrides: list[str]) -> float:
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"name={name}", f"output_dir={out}", "progress=false", "threads=1", "eval.env_kwargs={split: test}",
        "eval.greedy=false", "eval.before_rl=false", f"eval.episodes={args.eval_episodes}", f"train.steps={args.steps}",
        f"sft.steps={args.sft_steps}", f"train.save_every={args.steps}", "rollout.prefix_cache=true", *overrides,
    ])
    results = train(cfg, overwrite=True, recipe=lagged_recipe(lag, FIELDS[correction]))
    return results["final"]["sampled"]["success_rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--eval-episodes", type=int, default=300)
    parser.add_argument("--lags", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--corrections", nargs="+", choices=list(FIELDS), default=["none"],
                        help="off-policy corrections to try at lags above 0")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_staleness"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    settings = [(lag, c) for lag in args.lags for c in (["none"] if lag == 0 else args.corrections)]
    table: dict[str, list[float]] = {}
    for seed in args.seeds:
        for lag, correction in settings:
            key = f"lag{lag}_{correction}"
            success = run_one(f"{key}_seed{seed}", out, args, lag, correction, [f"seed={seed}", *args.overrides])
            table.setdefault(key, []).append(success)
            print(f"seed {seed} lag {lag} {correction:>9}: held-out success {success:.1%}", flush=True)
    print(f"\n{len(args.seeds)} seed(s), {args.steps} RL steps; held-out sampled success, mean (min-max)")
    for key, rows in table.items():
        print(f"{key:>16}: {statistics.mean(rows):.1%} ({min(rows):.1%}-{max(rows):.1%})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "runs": table}, indent=2))


if __name__ == "__main__":
    main()
