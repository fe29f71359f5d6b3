"""Offline DPO: TRL's DPOTrainer on a JSONL file of preference pairs.

A recipe selects it with `algorithm: {name: dpo, dataset: pairs.jsonl}`. Each line is
one pair in one of TRL's two explicit-prompt formats (one format per file):

    {"prompt": "2+3=", "chosen": "5", "rejected": "6"}                          # standard
    {"prompt": [{"role": "user", "content": "2+3="}],                           # conversational
     "chosen": [{"role": "assistant", "content": "5"}],
     "rejected": [{"role": "assistant", "content": "6"}]}

Other keys are ignored. The policy is `build_policy(cfg)`'s (a fresh LoRA adapter when
`lora.enabled`, whose reference is the adapter-disabled model; otherwise every weight is
trained against a frozen copy of the initial model). Config mapping: `train.steps` ->
`max_steps`, `algorithm.epochs` -> `num_train_epochs` (whichever ends first),
`algorithm.minibatch_size` -> pairs per optimizer step, `optim.*` -> AdamW with a
constant learning rate, `env.max_tokens` -> `max_length`. TRL's log records go to the
run folder's `metrics.jsonl` (`train/dpo_loss`, `train/reward_accuracy`, ...), and the
trained weights to a checkpoint under `run_dir/checkpoints`, so `looprl eval` and
`looprl export` take the run folder as they take any other. When `eval.episodes` > 0
the policy is also evaluated on `env.id` before and after, as RL runs are.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from looprl.config import RunConfig
from looprl.train.checkpoint import CheckpointManager
from looprl.train.context import open_run
from looprl.train.evaluate import evaluate_run, paired_changes
from looprl.train.metrics import MetricsLogger, init_wandb, write_text_atomic
from looprl.train.policy import trainable_state
from looprl.train.update import DPO_METRIC_NAMES

KEYS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant", "tool")


class PairsError(ValueError):
    """A preference-pair file is malformed; the message names the line and the key."""


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a JSONL of preference pairs; returns rows with exactly `KEYS`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DPO dataset {str(path)!r} does not exist")
    rows, first_format = [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PairsError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise PairsError(f"{where}: expected a JSON object with keys {list(KEYS)}, got {type(row).__name__}")
        row_format = _check_row(row, where)
        if first_format is not None and row_format != first_format:
            raise PairsError(f"{where}: a {row_format} row in a file of {first_format} rows (one format per file)")
        first_format = row_format
        rows.append({k: row[k] for k in KEYS})
    if not rows:
        raise PairsError(f"DPO dataset {str(path)!r} holds no preference pairs")
    return rows


def _check_row(row: dict, where: str) -> str:
    """'standard' (three non-empty strings) or 'conversational' (three lists of messages)."""
    for key in KEYS:
        if key not in row:
            raise PairsError(f"{where}: missing key {key!r} (each line needs {', '.join(KEYS)})")
    kinds = {key: type(row[key]) for key in KEYS}
    for key in KEYS:
        if kinds[key] not in (str, list):
            raise PairsError(f"{where}: key {key!r} must be a string or a list of messages, "
                             f"got {kinds[key].__name__}")
        if kinds[key] is not kinds["prompt"]:
            raise PairsError(f"{where}: key {key!r} is a {kinds[key].__name__} but 'prompt' is a "
                             f"{kinds['prompt'].__name__}: use strings for all three or messages for all three")
    for key in KEYS:
        value = row[key]
        if not value or (isinstance(value, str) and not value.strip()):
            raise PairsError(f"{where}: key {key!r} is empty")
        if isinstance(value, list):
            _check_messages(value, f"{where}: key {key!r}", final_assistant=key != "prompt")
    return "standard" if kinds["prompt"] is str else "conversational"


def _check_messages(messages: list, where: str, final_assistant: bool) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise PairsError(f"{where}: message {i} must be an object with string 'role' and 'content', "
                             f"got {message!r}")
        if message["role"] not in ROLES:
            raise PairsError(f"{where}: message {i} has role {message['role']!r}, expected one of {list(ROLES)}")
    if final_assistant and messages[-1]["role"] != "assistant":
        raise PairsError(f"{where}: the last message must be the assistant's, got role {messages[-1]['role']!r}")


def train_offline_dpo(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Offline DPO for a recipe whose `algorithm.dataset` is set; returns (and writes) the results."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if resume:
        raise ValueError("--resume is not supported for offline DPO (algorithm.dataset): start the run again")
    pairs = load_pairs(cfg.algorithm.dataset)  # before anything is written
    ctx = open_run(cfg, resume=False, overwrite=overwrite)
    model, tokenizer, run_dir, engine = ctx.model, ctx.tokenizer, ctx.run_dir, ctx.engine
    logger = MetricsLogger(run_dir, wandb_run=init_wandb(cfg.wandb.enabled, cfg.wandb.mode, cfg.wandb.project,
                                                         cfg.name, run_dir, cfg.model_dump(mode="json")))
    results: dict[str, Any] = {}

    class LogToRun(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logger.log({_metric_name(k): v for k, v in (logs or {}).items()}, state.global_step)

    algo = cfg.algorithm
    on_cpu = ctx.device.type == "cpu"
    args = DPOConfig(
        output_dir=str(run_dir / "trl"), use_cpu=on_cpu, bf16=cfg.model.dtype == "bfloat16" and not on_cpu,
        fp16=cfg.model.dtype == "float16" and not on_cpu, seed=cfg.seed, report_to=[],
        beta=algo.beta, max_length=cfg.env.max_tokens,
        # RPO's NLL term is TRL's "sft" loss (a token-mean over the batch's chosen tokens).
        loss_type=[algo.loss_type] + (["sft"] if algo.nll_coef > 0 else []),
        loss_weights=[1.0] + ([algo.nll_coef] if algo.nll_coef > 0 else []),
        max_steps=cfg.train.steps, num_train_epochs=algo.epochs, per_device_train_batch_size=algo.minibatch_size,
        learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1], max_grad_norm=cfg.optim.grad_clip, lr_scheduler_type="constant",
        warmup_steps=0, logging_steps=1, save_strategy="no", disable_tqdm=not cfg.progress,
    )
    ref_model = None if cfg.lora.enabled else copy.deepcopy(model).requires_grad_(False)
    with ctx.progress as progress:
        if cfg.eval.before_rl:
            results["warmstart"] = evaluate_run(cfg, engine, tokenizer, logger, progress, 0, "warmstart", run_dir)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(pairs),
                             processing_class=tokenizer, callbacks=[LogToRun()])
        output = trainer.train()
        model.eval()  # Trainer left it in train mode; rollouts and evaluation see the eval-mode policy
        ctx.publish()
        step = trainer.state.global_step
        results["dpo"] = {"steps": step, "seconds": output.metrics.get("train_runtime"), "pairs": len(pairs)}
        results["final"] = evaluate_run(cfg, engine, tokenizer, logger, progress, step, "final", run_dir)
        if change := paired_changes(cfg, logger, progress, step, run_dir):
            results["change"] = change
    CheckpointManager(run_dir / "checkpoints", keep_last=cfg.train.keep_checkpoints).save(
        step, model_state=trainable_state(model), blocking=True,
        extra={"policy_version": ctx.version, "config": cfg.model_dump(mode="json"), "results": results},
    )
    logger.close()
    write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    return results


def _metric_name(key: str) -> str:
    """TRL's log keys in looprl's namespaces (the same names as online DPO's where they match)."""
    names = {"loss": "train/dpo_loss", "grad_norm": "train/grad_norm", "learning_rate": "train/lr",
             "epoch": "train/epoch", **DPO_METRIC_NAMES}
    return names.get(key, f"train/{key}")
