"""How close a training step is to the machine's limit: the rollout and the update of real
steps against raw model work of the same size, measured in the same run (issue 21).

It trains a recipe (default: the quickstart's, `configs/quickstart.yaml`) through the real
trainer, with its warm start, and records each RL step:
- measured: the step's rollout and update seconds (the trainer's `perf/rollout_s` and
  `perf/train_s`; the update includes the publish) and episodes/s of the whole step;
- raw limits, after the last step, on the same model with the step's shapes: a plain
  KV-cached sampling decode of the step's mean sampled tokens per episode over the step's
  episodes at once (one prefill of their first prompts, then one forward per token: no
  environment, no later-turn prefill, no stopping), and `epochs` x one forward and
  backward over the step's trained rows as one right-padded batch (no optimizer step);
- ratios measured / raw (1.0x is the limit) and, for the last `--profiled` steps (run
  after the timed ones, under cProfile in every thread, so their own times are not
  reported), where the time goes: the functions with the most self time and the looprl
  functions with the most cumulative time, in ms per step.

    python bench/limits.py [--threads 1] [--steps 3] [--world calc|sql|apps] [--config PATH] [key=value ...]

`--world sql` / `apps` take `configs/loop/<world>_tiny_full_cpu.yaml` (long contexts) with
a short warm start (`--sft-steps`, default 200 for those: the figures are about speed, not
learning). Figures: docs/results/limits.md.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import os
import pstats
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from looprl.algorithms.core import token_logprobs  # noqa: E402
from looprl.config import load_config  # noqa: E402
from looprl.rollout.engine import left_pad  # noqa: E402
from looprl.train.batch import collate, micro_batches  # noqa: E402
from looprl.train.recipes.onpolicy import OnPolicy  # noqa: E402
from looprl.train.trainer import train  # noqa: E402

WORLDS = {"calc": "configs/quickstart.yaml", "sql": "configs/loop/sql_tiny_full_cpu.yaml",
          "apps": "configs/loop/apps_tiny_full_cpu.yaml"}
# Self time spent waiting (for a lock, a queue, the event loop's select): one line of the profile.
WAITS = ("acquire", "select", "poll", "'wait'", "sleep", "'get' of '_queue", "_thread.lock")


class ThreadProfiles:
    """cProfile in the calling thread and in every thread started while it runs (the
    engine's `asyncio.to_thread` batches, the environments' worker threads)."""

    def __init__(self):
        self.profiles: list[cProfile.Profile] = []

    def _start_here(self, *_):
        profile = cProfile.Profile()
        self.profiles.append(profile)
        profile.enable()  # replaces this hook in this thread

    def __enter__(self):
        threading.setprofile(self._start_here)
        self._start_here()
        return self

    def __exit__(self, *exc):
        threading.setprofile(None)
        self.profiles[0].disable()

    def stats(self) -> pstats.Stats:
        for profile in self.profiles:
            profile.disable()
        out = pstats.Stats(self.profiles[0])
        for profile in self.profiles[1:]:
            out.add(profile)
        return out


def measured_recipe(log: dict, profiled: int):
    """The on-policy recipe, recording each step's figures in `log`; its last `profiled`
    steps run under `ThreadProfiles`, the rollout and the update apart."""

    class Measured(OnPolicy):
        def step(self, ctx):
            self.profile = ctx.step >= ctx.cfg.train.steps - profiled
            since = dict(ctx.engine.stats)
            metrics = super().step(ctx)
            if self.profile:
                self.update_profile.__exit__()
                log["profiles"].append((self.rollout_profile.stats(), self.update_profile.stats()))
            else:
                log["steps"].append({**metrics, "engine_busy_s": ctx.engine.stats["busy_s"] - since["busy_s"]})
            if ctx.step + 1 == ctx.cfg.train.steps:
                log["raw"] = raw_limits(ctx, self.groups, self.rows)
            return metrics

        def collect(self, ctx, seeds):
            if self.profile:
                with ThreadProfiles() as self.rollout_profile:
                    collection = super().collect(ctx, seeds)
            else:
                collection = super().collect(ctx, seeds)
            self.groups = collection.episodes
            return collection

        def prepare(self, ctx, rows):
            self.rows = rows
            if self.profile:
                self.update_profile = ThreadProfiles().__enter__()  # left in step(), after the update
            return rows

    return Measured


def raw_limits(ctx, groups, rows, repeats: int = 3) -> dict[str, float]:
    """Seconds of the raw decode and fwd+bwd of this step's sizes (median of `repeats`)."""
    episodes = [e for g in groups for e in g]
    prompts = [e.chunks[0].input_ids[: e.chunks[0].turn_spans[0][0]] for e in episodes]
    new_tokens = round(statistics.mean(e.num_sampled_tokens for e in episodes))
    decode = statistics.median(
        _timed(lambda: raw_decode(ctx.model, prompts, new_tokens, ctx.tokenizer.pad_token_id,
                                  ctx.cfg.rollout.temperature)) for _ in range(repeats))
    trained = [t for t, _ in rows]
    budget = ctx.cfg.algorithm.micro_batch_tokens
    fwd_bwd = statistics.median(
        _timed(lambda: raw_forward_backward(ctx.model, trained, ctx.tokenizer.pad_token_id, budget))
        for _ in range(repeats))
    ctx.optimizer.zero_grad(set_to_none=True)
    return {"padded_update": padded_tokens(trained, ctx.cfg.algorithm.minibatch_size, budget),
            "padded_raw": sum(len(g) * max(len(trained[i].input_ids) for i in g)
                              for g in micro_batches([len(t.input_ids) for t in trained], budget)),
            "decode_s": decode, "decode_rows": len(prompts), "decode_tokens": new_tokens,
            "prompt_tokens": statistics.mean(map(len, prompts)),
            "fwd_bwd_s": fwd_bwd * ctx.cfg.algorithm.epochs, "fwd_bwd_rows": len(trained),
            "fwd_bwd_tokens": sum(len(t.input_ids) for t in trained),
            "epochs": ctx.cfg.algorithm.epochs}


def padded_tokens(trajectories, minibatch_size: int, max_tokens: int, draws: int = 20) -> float:
    """Padded tokens per epoch of the update's plan (shuffled minibatches, each split into
    length-sorted micro-batches), the mean over `draws` shuffles of a generator of its own."""
    lengths = [len(t.input_ids) for t in trajectories]
    rng, total = random.Random(0), 0
    for _ in range(draws):
        order = rng.sample(range(len(lengths)), len(lengths))
        for i in range(0, len(order), minibatch_size):
            part = [lengths[j] for j in order[i:i + minibatch_size]]
            total += sum(len(g) * max(part[k] for k in g) for g in micro_batches(part, max_tokens))
    return total / draws


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def raw_decode(model, prompts, new_tokens: int, pad_id: int, temperature: float) -> None:
    """One prefill of the left-padded `prompts`, then `new_tokens` sampled tokens for every
    row, one forward each: the least a batched decode of this size costs."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    # transformers 5.x names the forward's cache argument `cache`, earlier ones `past_key_values` (as HFEngine).
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{name: cache})
    position = positions[:, -1]
    for _ in range(new_tokens - 1):
        probs = torch.softmax(out.logits[:, -1].float() / max(temperature, 1e-6), -1)
        token = torch.multinomial(probs, 1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        position = position + 1
        out = model(input_ids=token, attention_mask=mask, position_ids=position[:, None], use_cache=True,
                    **{name: cache})


def raw_forward_backward(model, trajectories, pad_id: int, max_tokens: int) -> None:
    """One forward and backward of the sampled tokens' logprobs over `trajectories`, in
    length-sorted groups of at most `max_tokens` padded tokens (the least padding)."""
    device = next(model.parameters()).device
    for group in micro_batches([len(t.input_ids) for t in trajectories], max_tokens):
        batch = collate([trajectories[i] for i in group], pad_id, device=device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        (token_logprobs(logits, batch.input_ids[:, 1:]) * batch.loss_mask).sum().backward()


def profile_rows(stats: pstats.Stats, steps: int, top: int) -> tuple[list, list, float]:
    """(self-time rows, looprl cumulative rows, waiting ms), in ms per step."""
    own, ours, waiting = [], [], 0.0
    for (path, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        label = f"{_short(path)}:{line}({name})" if path != "~" else name
        if any(w in name for w in WAITS):
            waiting += tottime
            continue
        own.append((tottime * 1000 / steps, calls / steps, label))
        if "/looprl/" in path:
            ours.append((cumtime * 1000 / steps, calls / steps, label))
    return sorted(own, reverse=True)[:top], sorted(ours, reverse=True)[:top], waiting * 1000 / steps


def _short(path: str) -> str:
    for marker in ("/looprl/", "/site-packages/"):
        if marker in path:
            return path.split(marker, 1)[1] if marker != "/looprl/" else "looprl/" + path.split(marker, 1)[1]
    return os.path.basename(path)


def print_profile(title: str, stats: pstats.Stats, steps: int, top: int) -> None:
    own, ours, waiting = profile_rows(stats, steps, top)
    print(f"\n{title}: self time, ms per step (all threads; {waiting:.0f} ms waiting in locks/select left out)")
    print("| ms | calls | function |\n|---|---|---|")
    for ms, calls, label in own:
        print(f"| {ms:.1f} | {calls:.0f} | `{label}` |")
    print(f"\n{title}: looprl functions by cumulative time, ms per step")
    print("| ms | calls | function |\n|---|---|---|")
    for ms, calls, label in ours:
        print(f"| {ms:.1f} | {calls:.0f} | `{label}` |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (torch.set_num_threads)")
    parser.add_argument("--steps", type=int, default=3, help="timed RL steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="RL steps run first and not reported")
    parser.add_argument("--profiled", type=int, default=1, help="RL steps run last under cProfile")
    parser.add_argument("--world", choices=sorted(WORLDS), default="calc", help="which recipe (see the docstring)")
    parser.add_argument("--config", default=None, help="a recipe YAML instead of --world's")
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="warm-start steps (default: the recipe's for calc, 200 for sql and apps)")
    parser.add_argument("--top", type=int, default=12, help="rows of each profile table")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = Path(args.config) if args.config else ROOT / WORLDS[args.world]
    sft = args.sft_steps if args.sft_steps is not None else (None if args.world == "calc" else 200)
    steps = args.warmup + args.steps + args.profiled
    log: dict = {"steps": [], "profiles": []}
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [
            "name=limits", f"output_dir={out}", "progress=false", f"threads={args.threads}", "eval.episodes=0",
            "eval.before_rl=false", f"train.steps={steps}", f"train.save_every={steps}",
            *([f"sft.steps={sft}"] if sft is not None else []), *args.overrides])
        train(cfg, overwrite=True, recipe=measured_recipe(log, args.profiled))

    timed = log["steps"][args.warmup:]
    med = lambda key: statistics.median(s[key] for s in timed)  # noqa: E731
    rollout, update, busy, raw = med("perf/rollout_s"), med("perf/train_s"), med("engine_busy_s"), log["raw"]
    episodes = med("rollout/episodes")
    print(f"{config.relative_to(ROOT) if config.is_relative_to(ROOT) else config}, {args.threads} torch thread(s), "
          f"{len(timed)} timed steps (median), load average {os.getloadavg()[0]:.2f}; "
          f"{episodes:.0f} episodes/step, {med('rollout/tokens_mean'):.1f} sampled tokens and "
          f"{med('rollout/turns_mean'):.2f} turns per episode, {med('rollout/kept_frac'):.0%} kept, "
          f"{med('train/optimizer_steps'):.0f} optimizer steps")
    print("| piece of one step | measured (s) | raw limit (s) | measured / raw |\n|---|---|---|---|")
    print(f"| rollout | {rollout:.3f} | {raw['decode_s']:.3f} (decode {raw['decode_rows']} x {raw['decode_tokens']} "
          f"tokens after {raw['prompt_tokens']:.0f} prompt tokens) | {rollout / raw['decode_s']:.2f}x |")
    print(f"| of which in the engine's generate_batch | {busy:.3f} | | {busy / raw['decode_s']:.2f}x |")
    print(f"| update | {update:.3f} | {raw['fwd_bwd_s']:.3f} ({raw['epochs']} x fwd+bwd of {raw['fwd_bwd_rows']} rows, "
          f"{raw['fwd_bwd_tokens']} tokens) | {update / raw['fwd_bwd_s']:.2f}x |")
    step, limit = rollout + update, raw["decode_s"] + raw["fwd_bwd_s"]
    print(f"| whole step | {step:.3f} | {limit:.3f} | {step / limit:.2f}x |")
    print(f"episodes/s: {episodes / step:.1f} measured, {episodes / limit:.1f} at the raw limits")
    print(f"padded tokens per epoch: {raw['padded_update']:.0f} in the update's shuffled minibatches, "
          f"{raw['padded_raw']} length-sorted (the raw fwd+bwd), {raw['fwd_bwd_tokens']} real")
    n = len(log["profiles"])
    if n:
        rollout_stats, update_stats = log["profiles"][0]
        for extra_rollout, extra_update in log["profiles"][1:]:
            rollout_stats.add(extra_rollout)
            update_stats.add(extra_update)
        print_profile("rollout (profiled)", rollout_stats, n, args.top)
        print_profile("update (profiled)", update_stats, n, args.top)


if __name__ == "__main__":
    main()
