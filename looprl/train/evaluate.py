"""Held-out evaluation: success rate, return, turns and tokens over N episodes, one record per
episode, and the paired change between two evaluations of the same tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from looprl.envs import ToolEnv, make_env
from looprl.envs.wrappers import RecordToolErrors
from looprl.rollout.collect import EpisodePlayer, FaultPolicy
from looprl.rollout.engine import InferenceEngine, SamplingParams
from looprl.train.metrics import read_jsonl, write_text_atomic
from looprl.types import Episode, Trajectory

EVAL_SEED = 1234


def evaluate_episodes(
    engine: InferenceEngine,
    tokenizer,
    env_id: str,
    env_kwargs: dict[str, Any],
    episodes: int,
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    max_tokens: int = 1024,
    context_window: int | None = None,
    faults: FaultPolicy = FaultPolicy(),
    concurrency: str = "thread",
    samples: int = 1,
    sampling_seed: int = EVAL_SEED,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Play `samples` episodes on each of seeds 0..N-1 (the same tasks every time); one record each.

    An environment whose tasks are a finite dataset (`ToolEnv.task_ids`) plays its rows
    instead, each once: seed i poses row i, for the first min(N, rows) rows.

    Each episode samples from its own stream, `stream_seed(sampling_seed, seed, sample)`
    (see `EpisodePlayer`): its outcome does not depend on the engine's batch size, on the
    other episodes played with it or on `episodes`, two policies are compared on the same
    draws (records pair up by `seed`, see `paired_change`), and evaluating never moves the
    training run's random stream. Episodes go through the run's collection path (`faults`,
    `concurrency`); a task whose episode is lost on every attempt is lost whole.

    Returns:
        `(records, lost)`: a record per played episode (with its `sample` index), in seed
        order, and one `{"seed", "reason", "detail"}` per task lost.
    """
    if samples < 1:
        raise ValueError(f"Expect `samples` to be >= 1, actually: {samples}")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    player = EpisodePlayer(engine, tokenizer, lambda: make_env(env_id, **env_kwargs), params, max_tokens=max_tokens,
                           context_window=context_window, faults=faults, concurrency=concurrency,
                           sampling_seed=sampling_seed, wrap=RecordToolErrors, observe=RecordToolErrors.counts)
    rows = dataset_rows(env_id, env_kwargs)
    seeds = list(range(episodes if rows is None else min(episodes, len(rows))))
    options = None if rows is None else [{"task": rows[s]} for s in seeds]
    with torch.random.fork_rng(devices=[]):  # nothing evaluation does moves the run's random stream
        collection = player.collect(seeds, samples, reset_options=options)
    played = {g.seed for g in collection.groups}
    last_failure = {f.seed: f.error for f in collection.failures}
    lost = [{"seed": s, "reason": last_failure[s].reason, "detail": last_failure[s].detail}
            for s in seeds if s not in played]
    records = [episode_record(g.seed, episode, tokenizer) | g.observed[k] | {"sample": k}
               for g in collection.groups for k, episode in enumerate(g.episodes)]
    return records, lost


def dataset_rows(env_id: str, env_kwargs: dict[str, Any]) -> list[str] | None:
    """The task ids of an environment whose tasks are a finite dataset (`ToolEnv.task_ids`),
    in order; None when its tasks are generated from seeds (or it is not a `ToolEnv`)."""
    env = make_env(env_id, **env_kwargs)
    try:
        base = env.unwrapped
        return base.task_ids() if isinstance(base, ToolEnv) else None
    finally:
        env.close()


def eval_settings(cfg) -> dict[str, Any]:
    """What `evaluate_episodes` takes from a run's config: its held-out tasks and episodes,
    its turn and episode limits and its fault policy (the temperature is per mode, `eval_modes`).
    The run's own evaluations and `looprl eval RUN` both read it, so they play the same episodes."""
    return {
        "env_id": cfg.env.id, "env_kwargs": {**cfg.env.kwargs, **cfg.eval.env_kwargs}, "episodes": cfg.eval.episodes,
        "max_new_tokens": cfg.rollout.max_new_tokens, "max_tokens": cfg.env.max_tokens,
        "context_window": cfg.rollout.context_window,
        "faults": FaultPolicy(cfg.rollout.env_retries, cfg.rollout.env_step_timeout),
        "concurrency": cfg.env.concurrency,
    }


def episode_record(seed: int, episode: Trajectory | Episode, tokenizer=None) -> dict[str, Any]:
    """What a report keeps of one evaluation episode (with a tokenizer, its transcript too)."""
    record = {
        "seed": seed,
        "task_id": episode.task_id,
        "success": bool(episode.info.get("success")),
        "return": episode.reward,
        "turns": episode.num_turns,
        "tokens": episode.num_sampled_tokens,
        "truncated": bool(episode.truncated),
    }
    if tokenizer is not None:
        record["messages"] = transcript(episode, tokenizer)
    return record


def transcript(episode: Trajectory | Episode, tokenizer) -> list[dict[str, str]]:
    """The episode as the policy saw and wrote it: each sampled turn (`assistant`) and the
    context between turns (`context`: the prompt, tool results, the environment's
    messages), decoded from its tokens, special tokens included (`looprl report` shows it)."""
    messages = []
    for chunk in episode.chunks:
        ids, at = chunk.input_ids, 0
        for start, end in chunk.turn_spans:
            if start > at:
                messages.append({"role": "context", "content": tokenizer.decode(ids[at:start])})
            messages.append({"role": "assistant", "content": tokenizer.decode(ids[start:end])})
            at = end
        if at < len(ids):
            messages.append({"role": "context", "content": tokenizer.decode(ids[at:])})
    return messages


def summarize(records: Sequence[dict[str, Any]], lost: int = 0) -> dict[str, float]:
    """Success (with its standard error), return, turns, tokens and the tool-error rate (the
    share of tool results that were errors, 0 if no tool ran) over the played episodes;
    `lost_episodes` counts the episodes lost to their environment, which are not in them."""
    n = len(records)
    success = sum(r["success"] for r in records) / n
    results = sum(r["tool_results"] for r in records)
    return {
        "episodes": n,
        "lost_episodes": lost,
        "success_rate": success,
        "success_stderr": math.sqrt(success * (1 - success) / n),
        "mean_return": sum(r["return"] for r in records) / n,
        "mean_turns": sum(r["turns"] for r in records) / n,
        "mean_tokens": sum(r["tokens"] for r in records) / n,
        "truncated_frac": sum(r["truncated"] for r in records) / n,
        "tool_error_rate": sum(r["tool_errors"] for r in records) / results if results else 0.0,
    }


def paired_change(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How success changed between two evaluations of the same tasks, paired by seed.

    Paired, the noise of which tasks were drawn cancels: only the episodes whose outcome
    changed count. `gained` went from failure to success, `lost` the other way, and
    `p_value` is the exact two-sided sign test of gained against lost (the chance of a
    split at least this uneven if the policies were equally good).
    """
    by_seed = {r["seed"]: r for r in before}
    if len(by_seed) != len(before) or {r["seed"] for r in after} != set(by_seed) or len(after) != len(before):
        raise ValueError(f"Expect two evaluations of the same seeds to pair, actually {len(before)} and "
                         f"{len(after)} episodes on different seeds")
    for r in after:
        if r["task_id"] != by_seed[r["seed"]]["task_id"]:
            raise ValueError(f"Expect seed {r['seed']} to be the same task in both evaluations, actually "
                             f"{by_seed[r['seed']]['task_id']!r} and {r['task_id']!r}")
    gained = sum(r["success"] and not by_seed[r["seed"]]["success"] for r in after)
    lost = sum(by_seed[r["seed"]]["success"] and not r["success"] for r in after)
    n = len(after)
    return {
        "episodes": n,
        "before": sum(r["success"] for r in before) / n,
        "after": sum(r["success"] for r in after) / n,
        "change": (gained - lost) / n,
        "gained": gained,
        "lost": lost,
        "p_value": sign_test(gained, lost),
    }


def sign_test(a: int, b: int) -> float:
    """Exact two-sided sign test: P(a split at least as uneven as a:b | each side 1/2)."""
    n, k = a + b, min(a, b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def describe_change(change: dict[str, float]) -> str:
    """`+3.8 pts (53 gained, 15 lost; sign test p = 4e-06)`."""
    return (f"{100 * change['change']:+.1f} pts ({change['gained']} gained, {change['lost']} lost; "
            f"sign test p = {change['p_value']:.2g})")


def eval_modes(cfg) -> dict[str, float]:
    """A run's evaluation modes and their temperatures: sampled as in training, and greedy."""
    return {"sampled": cfg.rollout.temperature} | ({"greedy": 0.0} if cfg.eval.greedy else {})


def evaluate_run(cfg, engine: InferenceEngine, tokenizer, logger, progress, step: int, tag: str,
                 run_dir: Path) -> dict[str, Any]:
    """Evaluate a run's policy in each mode on its held-out tasks; each episode's record goes
    to `run_dir/eval/{tag}_{mode}.jsonl`, the lost ones to `{tag}_{mode}_lost.jsonl`."""
    if cfg.eval.episodes == 0:
        return {}
    results = {}
    for mode, temperature in eval_modes(cfg).items():
        progress.note(f"evaluating {tag} policy ({mode}, {cfg.eval.episodes} episodes)")
        records, lost = evaluate_episodes(engine, tokenizer, **eval_settings(cfg), temperature=temperature)
        write_text_atomic(run_dir / "eval" / f"{tag}_{mode}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        lost_path = run_dir / "eval" / f"{tag}_{mode}_lost.jsonl"
        if lost:
            write_text_atomic(lost_path, "".join(json.dumps(r) + "\n" for r in lost))
            progress.note(f"{tag} ({mode}): {len(lost)} of {cfg.eval.episodes} episodes were lost to their "
                          f"environment (seeds {[r['seed'] for r in lost][:10]}...; see {lost_path})")
        else:
            lost_path.unlink(missing_ok=True)
        results[mode] = summarize(records, lost=len(lost))
        logger.log({f"eval/{tag}/{mode}/{k}": v for k, v in results[mode].items()}, step)
    progress.note(f"{tag}: " + ", ".join(f"{m} success {r['success_rate']:.1%}" for m, r in results.items()))
    return results


def paired_changes(cfg, logger, progress, step: int, run_dir: Path) -> dict[str, Any]:
    """Per mode, the final policy's paired change from the warm start on the same tasks
    (when this run evaluated both); seeds lost in either evaluation are left out of the pairing."""
    changes = {}
    for mode in eval_modes(cfg):
        before, after = (run_dir / "eval" / f"{tag}_{mode}.jsonl" for tag in ("warmstart", "final"))
        if cfg.eval.episodes == 0 or not (before.exists() and after.exists()):
            continue
        lost = {r["seed"] for tag in ("warmstart", "final")
                if (path := run_dir / "eval" / f"{tag}_{mode}_lost.jsonl").exists() for r in read_jsonl(path)}
        try:
            changes[mode] = paired_change([r for r in read_jsonl(before) if r["seed"] not in lost],
                                          [r for r in read_jsonl(after) if r["seed"] not in lost])
        except ValueError as e:  # e.g. resumed with another eval.episodes: report no change, keep the run
            progress.note(f"no paired {mode} change from the warm start: {e}")
            continue
        logger.log({f"eval/change/{mode}/{k}": v for k, v in changes[mode].items()}, step)
        progress.note(f"{mode} change from the warm start: {describe_change(changes[mode])}")
    return changes
