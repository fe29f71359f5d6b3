"""Run by tests/distributed/test_data_parallel.py, as one process or under
`torchrun --nproc_per_node 2` (gloo): the same code either way, so the two can be compared.

    python dp_worker.py update {full,lora,lora_kl} OUT FIRST LAST [--load CKPT_DIR] [--save CKPT_DIR]
        updates FIRST..LAST-1 on fixed rows; rank 0 saves their losses, the weights and optimizer state.
        --save: as `looprl train` checkpoints (one process: CheckpointManager; several ranks: a
        ShardedCheckpointer, which also saves the policy before the first update, as a fresh run's
        step 0 is saved, and which the updates wait for); --load: the latest checkpoint of either format
    python dp_worker.py zero OUT_DIR   in one launch (DeepSpeed starts slowly), with DeepSpeed ZeRO-1/2/3:
        `update` full and LoRA (OUT_DIR/zero{stage}_{mode}.pt), and full updates 0..1 saved, then
        update 2 resumed from that checkpoint (zero{stage}_saved.pt, zero{stage}_resumed.pt); and
        ZeRO-3 with a KL penalty to the reference (zero3_lora_kl.pt)
    python dp_worker.py recipe RUN_ROOT STEPS EVAL [--resume]   a whole tiny LOOP recipe
    python dp_worker.py recipe_zero RUN_ROOT STAGE   the tiny LOOP recipe with DeepSpeed ZeRO-STAGE, in one
        launch: 4 steps in RUN_ROOT/whole; 2 steps in RUN_ROOT/part, then resumed there to 4
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from looprl.config import from_dict  # noqa: E402
from looprl.train import sharded_checkpoint  # noqa: E402
from looprl.train.any_checkpoint import is_sharded, latest_checkpoint_in  # noqa: E402
from looprl.train.checkpoint import CheckpointManager  # noqa: E402
from looprl.train.context import build_optimizer  # noqa: E402
from looprl.train.logprobs import chunked_support  # noqa: E402
from looprl.train.parallel import Parallel  # noqa: E402
from looprl.train.policy import build_policy, load_trainable_state  # noqa: E402
from looprl.train.update import update_policy  # noqa: E402
from tests.helpers import make_context  # noqa: E402
from tests.recipes.test_recipes import tiny_recipe  # noqa: E402
from tests.train.test_batch import random_trajectory  # noqa: E402

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


def fixed_rows(step: int, vocab: int):
    """Rows of very different lengths (the split across ranks is by tokens), fixed per step."""
    rng = random.Random(step)
    lengths = [rng.randint(6, 60) for _ in range(11)]
    return [(random_trajectory(rng, vocab, n), rng.uniform(-1, 1)) for n in lengths]


def update(mode: str, out: Path, first: int, last: int, load: Path | None, save: Path | None,
           backend: str = "auto", zero_stage: int = 2) -> None:
    """Updates `first`..`last - 1` on fixed rows, from a fresh policy or the checkpoint `load`;
    the policy checkpointed to `save` after them (as `looprl train` does)."""
    torch.set_num_threads(1)
    packing = mode.endswith("_packed")  # the rows end to end (algorithm.packing)
    mode = mode.removesuffix("_packed")
    lora = mode in ("lora", "lora_kl")
    kl = {"name": "grpo", "kl_coef": 0.5} if mode == "lora_kl" else {}  # the reference: the adapter disabled
    cfg = from_dict({"model": {"tiny": TINY}, "lora": {"enabled": lora, "r": 4, "alpha": 8},
                     "algorithm": {"epochs": 2, "minibatch_size": 4, "micro_batch_tokens": 64, "loss_agg": "token-mean",
                                   "packing": packing, **kl},
                     "optim": {"lr": 1e-2, "weight_decay": 0.0, "grad_clip": 1.0}})
    torch.manual_seed(0)
    model, tokenizer = build_policy(cfg)
    if lora:  # an adapter that already moves the output, so LoRA's A and B both get gradients
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    ctx = make_context(cfg, model, tokenizer, build_optimizer(cfg, model), None, None)
    ctx.parallel = Parallel.from_env(backend, zero_stage)
    optimizer_state, shards = None, None
    if load is not None and is_sharded(latest := latest_checkpoint_in(load)):
        shards = latest  # loaded into the policy as it trains: sharded (several ranks) or plain
    elif load is not None:
        ckpt = CheckpointManager.load(latest)
        load_trainable_state(model, ckpt.model_state)
        optimizer_state = ckpt.optimizer_state
        if not ctx.parallel.distributed:
            ctx.optimizer.load_state_dict(optimizer_state)
    ctx.shard(optimizer_state)  # as `train` does: several ranks shard and load the optimizer state here
    if shards is not None:
        sharded_checkpoint.load(shards, ctx.model, ctx.optimizer)
    checkpointer = None
    if save is not None and ctx.parallel.sharded_checkpoints:
        checkpointer = sharded_checkpoint.ShardedCheckpointer(save)
        checkpointer.save(first, ctx.model, ctx.optimizer, extra={})  # a fresh optimizer: the step-0 save
    if ctx.parallel.distributed:  # the chunked pass would bypass the root's forward (FSDP gathers the head
        # there; DeepSpeed's engine hooks the backward there)
        assert ("DeepSpeedEngine" if backend == "deepspeed" else "FSDP2") in (chunked_support(ctx.model) or "")
    loaded = {"state": {k: v.clone() for k, v in ctx.trained_state().items()},
              "optimizer": copy.deepcopy(ctx.optimizer_state())}  # one process: the live tensors
    steps = []
    for step in range(first, last):
        torch.manual_seed(100 + step)  # the minibatch order: rank 0's, broadcast
        metrics = update_policy(cfg, ctx.algorithm, ctx.model, tokenizer, ctx.optimizer,
                                fixed_rows(step, len(tokenizer)), parallel=ctx.parallel,
                                before_step=checkpointer and checkpointer.wait_staged)
        steps.append({k: metrics[k] for k in ("train/pg_loss", "train/grad_norm", "train/optimizer_steps", "train/kl")
                      if k in metrics})
    state = {k: v.clone() for k, v in ctx.trained_state().items()}
    optimizer_state = ctx.optimizer_state()
    if checkpointer is not None:
        checkpointer.save(last, ctx.model, ctx.optimizer, extra={})
        checkpointer.close()
    elif save is not None and ctx.parallel.is_main:  # one process, or DeepSpeed's gathered state on rank 0
        CheckpointManager(save).save(last, model_state=state, optimizer_state=optimizer_state, extra={}, blocking=True)
    ctx.parallel.barrier()  # rank 0's checkpoint is complete before another launch's update loads it
    if ctx.parallel.is_main:
        torch.save({"metrics": steps, "state": state, "optimizer": optimizer_state, "loaded": loaded,
                    "world": ctx.parallel.world}, out)


def recipe(root: Path, steps: int, episodes: int, resume: bool, train: dict | None = None, **sections) -> None:
    from looprl.train.trainer import train as train_recipe

    parallel = Parallel.from_env()
    cfg = tiny_recipe(root, train={"steps": steps, "save_every": 2, **(train or {})},
                      eval={"episodes": episodes, "greedy": False}, **sections)
    results = train_recipe(cfg, resume=resume)
    if parallel.is_main:
        (root / f"results_{steps}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1] == "zero":
        for zero_stage in (1, 2, 3):
            for mode in ("full", "lora"):
                update(mode, Path(sys.argv[2]) / f"zero{zero_stage}_{mode}.pt", 0, 3, None, None, "deepspeed", zero_stage)
            out, ckpt = Path(sys.argv[2]), Path(sys.argv[2]) / f"ckpt{zero_stage}"
            update("full", out / f"zero{zero_stage}_saved.pt", 0, 2, None, ckpt, "deepspeed", zero_stage)
            update("full", out / f"zero{zero_stage}_resumed.pt", 2, 3, ckpt, None, "deepspeed", zero_stage)
        update("lora_kl", Path(sys.argv[2]) / "zero3_lora_kl.pt", 0, 3, None, None, "deepspeed", 3)
    elif sys.argv[1] == "recipe_zero":
        # A smaller learning rate than the tiny recipe's: the policy keeps succeeding sometimes,
        # so the steps after the resume train too.
        ds = {"train": {"backend": "deepspeed", "zero_stage": int(sys.argv[3])}, "optim": {"lr": 1e-3}}
        recipe(Path(sys.argv[2]) / "whole", 4, 0, False, **ds)
        recipe(Path(sys.argv[2]) / "part", 2, 0, False, **ds)
        recipe(Path(sys.argv[2]) / "part", 4, 0, True, **ds)
    elif sys.argv[1] == "update":
        opts = dict(zip(sys.argv[6::2], sys.argv[7::2]))
        update(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
               Path(opts["--load"]) if "--load" in opts else None, Path(opts["--save"]) if "--save" in opts else None)
    else:
        recipe(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), "--resume" in sys.argv)
