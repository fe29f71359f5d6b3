"""Run by tests/distributed/test_sequence_parallel.py under `torchrun --nproc_per_node 2` (gloo).

    python sp_worker.py update {full,lora,adaptive} OUT DEGREE [BACKEND]   3 updates on dp_worker's fixed rows,
        each row split over DEGREE ranks (1 in one process: the reference; `adaptive`: planned per minibatch);
        rank 0 saves losses and weights
    python sp_worker.py recipe RUN_ROOT   the tiny LOOP recipe twice, train.sequence_parallel=1 and 2
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from looprl.config import from_dict  # noqa: E402
from looprl.train.context import build_optimizer, sequence_cost_model  # noqa: E402
from looprl.train.parallel import Parallel  # noqa: E402
from looprl.train.policy import build_policy  # noqa: E402
from looprl.train.trainer import train  # noqa: E402
from looprl.train.ulysses import splittable_degrees  # noqa: E402
from looprl.train.update import update_policy  # noqa: E402
from tests.distributed.dp_worker import TINY, fixed_rows  # noqa: E402
from tests.helpers import make_context  # noqa: E402
from tests.recipes.test_recipes import tiny_recipe  # noqa: E402


def update(mode: str, out: Path, degree: int | str, backend: str = "auto") -> None:
    """dp_worker's 3 updates (18 optimizer steps) of a fresh policy, rows split over `degree` ranks,
    the policy sharded by `backend` (FSDP2 or DeepSpeed ZeRO-2). Mode `adaptive`: full weights,
    the blocks planned per minibatch (degree `adaptive`) with 40 tokens a rank, so rows over 40 of
    dp_worker's 6-60 tokens train over both ranks and the others one rank each; the plans' degrees
    are saved too."""
    torch.set_num_threads(1)
    adaptive = degree == "adaptive"
    tokens = 40 if mode == "adaptive" else 64
    cfg = from_dict({"model": {"tiny": TINY}, "lora": {"enabled": mode == "lora", "r": 4, "alpha": 8},
                     "algorithm": {"epochs": 2, "minibatch_size": 4, "micro_batch_tokens": tokens,
                                   "loss_agg": "token-mean"},
                     "optim": {"lr": 1e-2, "weight_decay": 0.0, "grad_clip": 1.0},
                     "train": {"sequence_parallel": 1 if adaptive else int(degree),
                               "sequence_parallel_adaptive": adaptive}})
    plans = []
    if adaptive:  # record each minibatch's degrees
        import looprl.train.update as update_module

        planned = update_module.heuristic_plan

        def recorded(*args, **kwargs):
            plan = planned(*args, **kwargs)
            plans.append(plan.degrees)
            return plan

        update_module.heuristic_plan = recorded
    torch.manual_seed(0)
    model, tokenizer = build_policy(cfg)
    if mode == "lora":  # an adapter that already moves the output, so LoRA's A and B both get gradients
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    ctx = make_context(cfg, model, tokenizer, build_optimizer(cfg, model), None, None)
    ctx.parallel = Parallel.from_env(backend)
    if adaptive:
        degrees = splittable_degrees(model, ctx.parallel.world)
        ctx.parallel.plan_sequences(degrees, sequence_cost_model(None, model, degrees))
    else:
        ctx.parallel.split_sequences(int(degree))
    ctx.shard()
    steps = []
    for step in range(3):
        torch.manual_seed(100 + step)  # the minibatch order: rank 0's, broadcast
        metrics = update_policy(cfg, ctx.algorithm, ctx.model, tokenizer, ctx.optimizer,
                                fixed_rows(step, len(tokenizer)), parallel=ctx.parallel)
        steps.append({k: metrics[k] for k in ("train/pg_loss", "train/grad_norm", "train/optimizer_steps",
                                              "train/split_row_frac") if k in metrics})
    state = {k: v.clone() for k, v in ctx.trained_state().items()}
    if ctx.parallel.is_main:
        torch.save({"metrics": steps, "state": state, "degree": ctx.parallel.sequence_degree, "plans": plans}, out)


def recipe(root: Path) -> None:
    """The same run without and with its rows split over the two ranks (`off/t`, `on/t`), and
    with the blocks planned per minibatch at 192 tokens a rank (`adaptive/t`: rows of more
    train over both ranks, shorter ones one rank each)."""
    for name, degree in (("off", 1), ("on", 2)):
        train(tiny_recipe(root / name, train={"steps": 4, "save_every": 4, "sequence_parallel": degree},
                          optim={"lr": 2e-3}))
    train(tiny_recipe(root / "adaptive", train={"steps": 4, "save_every": 4, "sequence_parallel_adaptive": True},
                      algorithm={"micro_batch_tokens": 192}, optim={"lr": 2e-3}))


if __name__ == "__main__":
    if sys.argv[1] == "update":
        update(sys.argv[2], Path(sys.argv[3]), sys.argv[4], *sys.argv[5:])
    else:
        recipe(Path(sys.argv[2]))
