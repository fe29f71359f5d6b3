"""ExIt at inference: success against the number of self-improvement steps, trained vs untrained.

For the warm-started policy (the run's step-0 checkpoint) and the ExIt-trained one (its
latest checkpoint), plays each held-out task once (attempt 1), then T - 1 revisions in a
chain: attempt t starts from the history of attempts 1..t-1 (`ReviseAttempts`, with the
run's `exit.context`) and asks for a revision. Success at t is the success of attempt t,
the latest solution. The paper's claim (Jiang et al. 2025) is that the trained policy
keeps improving past the number of attempts it saw in training (`exit.max_attempts` + 1),
marked on the plot. An attempt cut by the token limit counts as a failure, and the next
revision starts again from the last finished attempt. Sampling uses a fixed torch seed
(both policies see the same draws). Prints a table; writes a PNG and a JSON.

    python bench/exit_iterations.py runs/exit/exit_seed0 [--control runs/exit/grpo_seed0]
        [--iterations 8] [--episodes 200]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from looprl.envs import make_env
from looprl.rollout.engine import HFEngine, SamplingParams
from looprl.rollout.exit_sampler import StartingPoint
from looprl.rollout.revisions import collect_revisions
from looprl.train.checkpoint import CheckpointManager
from looprl.train.policy import build_policy, load_trainable_state
from looprl.train.trainer import config_of_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234


def success_by_attempt(engine, tokenizer, cfg, episodes: int, iterations: int, temperature: float) -> list[float]:
    env_kwargs = {**cfg.env.kwargs, **cfg.eval.env_kwargs}
    params = SamplingParams(cfg.rollout.max_new_tokens, temperature)
    starts = [StartingPoint(seed=s) for s in range(episodes)]
    rates = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for _ in range(iterations):
            groups, histories = collect_revisions(
                engine, tokenizer, lambda: make_env(cfg.env.id, **env_kwargs), starts, 1, params,
                max_tokens=cfg.env.max_tokens, context=cfg.exit.context)
            rates.append(sum(bool(g[0].info.get("success")) for g in groups) / episodes)
            starts = [s if h[0] is None else StartingPoint(s.seed, tuple(h[0]), (*s.modes, "revise"), s.attempts + 1)
                      for s, h in zip(starts, histories)]
            print(f"  attempt {len(rates)}: success {rates[-1]:.1%}", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="ExIt run folders (one per seed; the curves are averaged)")
    parser.add_argument("--control", nargs="*", default=[],
                        help="run folders of the control (same recipe, exit.p_fresh=1.0: plain GRPO); "
                             "their final policies are plotted too")
    parser.add_argument("--iterations", type=int, default=8, help="attempts per task (1 + revisions)")
    parser.add_argument("--episodes", type=int, default=200, help="held-out tasks")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "algorithms" / "exit_iterations.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    curves: dict[str, list[list[float]]] = {"warm-start (untrained)": [], "ExIt-trained": []}
    if args.control:
        curves["plain GRPO, same steps"] = []
    for run in args.runs + args.control:
        control = run in args.control
        checkpoints = CheckpointManager(Path(run) / "checkpoints").list()
        if len(checkpoints) < 2:
            raise SystemExit(f"{run}: expected the step-0 and a later checkpoint, found {checkpoints}")
        cfg = config_of_checkpoint(checkpoints[-1])
        model, tokenizer = build_policy(cfg)
        engine = HFEngine(model, tokenizer, max_batch_size=cfg.rollout.max_batch_size,
                          prefix_cache=cfg.rollout.prefix_cache)
        pairs = [("plain GRPO, same steps", checkpoints[-1])] if control else zip(
            ("warm-start (untrained)", "ExIt-trained"), (checkpoints[0], checkpoints[-1]))
        for label, path in pairs:
            ckpt = CheckpointManager.load(path)
            print(f"{run}: {label} (step {ckpt.step})", flush=True)
            load_trainable_state(model, ckpt.model_state)
            engine.update_weights()
            curves[label].append(success_by_attempt(engine, tokenizer, cfg, args.episodes, args.iterations,
                                                    args.temperature))
    mean = {k: [sum(c[t] for c in v) / len(v) for t in range(args.iterations)] for k, v in curves.items()}
    print("attempt  " + "  ".join(f"{k:>24}" for k in mean))
    for t in range(args.iterations):
        print(f"{t + 1:>7}  " + "  ".join(f"{v[t]:>24.1%}" for v in mean.values()))
    trained_depth = cfg.exit.max_attempts + 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"runs": args.runs, "control": args.control, "episodes": args.episodes, "temperature": args.temperature,
         "trained_attempts": trained_depth, "curves": curves, "mean": mean}, indent=2))
    plot(mean, trained_depth, cfg.env.id, args, out)


def plot(mean: dict[str, list[float]], trained_depth: int, env_id: str, args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    steps = list(range(1, args.iterations + 1))
    for label, rates in mean.items():
        ax.plot(steps, [100 * r for r in rates], marker="o", label=label)
    ax.axvline(trained_depth, color="grey", linestyle="--", linewidth=1)
    ax.text(trained_depth - 0.08, ax.get_ylim()[0] + 2, "deepest attempt\nseen in training", color="grey",
            fontsize=8, ha="right")
    ax.set_xlabel("attempt (1 = first answer, t = after t-1 self-improvement steps)")
    ax.set_ylabel("held-out success of the latest attempt (%)")
    name = env_id.removeprefix("looprl/")
    ax.set_title(f"ExIt on {name}, tiny model ({len(args.runs)} seed(s), {args.episodes} tasks)")
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
