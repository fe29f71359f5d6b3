"""Export a trained policy: a transformers model folder (LoRA merged) or a PEFT adapter.

Both load with this project's transformers 5 and with transformers 4.x (the 4.57 that
vLLM pins): after `save_pretrained`, `config.json` and `tokenizer_config.json` also get
the fields in the form 4.x reads (`make_transformers4_compatible`), which 5.x reads back
to the same config and tokenizer. Without them 4.x reads `rope_theta` as its default
10000 (5.x keeps it in `rope_parameters`), silently, and fails on the tokenizer (5.x
writes `extra_special_tokens` as a list). A `README.md` model card holds the run's
held-out evaluation and its settings.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from looprl.config import RunConfig, from_dict
from looprl.config_show import changed_settings
from looprl.train.any_checkpoint import find_any_checkpoint, load_trained_weights, read_checkpoint
from looprl.train.checkpoint import Checkpoint
from looprl.train.evaluate import describe_change
from looprl.train.models import merge_lora, resolve_model_path
from looprl.train.policy import build_policy


def load_trained_policy(source: str | Path):
    """Rebuild `(model, tokenizer, config)` from a run folder or a checkpoint folder (either format:
    `looprl.train.any_checkpoint`)."""
    ckpt = read_checkpoint(find_any_checkpoint(source))
    cfg = run_config(ckpt)
    return (*_rebuild(cfg, ckpt), cfg)


def run_config(ckpt: Checkpoint) -> RunConfig:
    """The run config a checkpoint's manifest stores (one line naming the checkpoint if none)."""
    if not isinstance(ckpt.extra.get("config"), dict):
        raise ValueError(f"Checkpoint {ckpt.path} holds no run config (manifest extra.config): it was not written "
                         "by `looprl train`, so its weights cannot be rebuilt into a policy")
    return from_dict(ckpt.extra["config"])


def _rebuild(cfg: RunConfig, ckpt: Checkpoint):
    model, tokenizer = build_policy(cfg)
    load_trained_weights(model, ckpt)
    return model, tokenizer


def export(source: str | Path, out: str | Path, adapter_only: bool = False) -> Path:
    """Write a run's policy to `out` (atomically), with its tokenizer, chat template and a model card.

    By default the LoRA adapter (if any) is merged: the folder loads with
    `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`
    (transformers 4.57 and 5) and serves with vLLM as it is. With `adapter_only`, a LoRA
    run's adapter is written as PEFT writes it (`adapter_config.json`,
    `adapter_model.safetensors`, its `base_model_name_or_path` the run's base model):
    `PeftModel.from_pretrained(base, out)` loads it.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"Export folder {str(out)!r} exists and is not empty")
    ckpt_dir = find_any_checkpoint(source)
    ckpt = read_checkpoint(ckpt_dir)
    cfg = run_config(ckpt)
    if adapter_only and not cfg.lora.enabled:
        raise ValueError(f"{source} is a full fine-tune run (lora.enabled=false): it has no adapter to export; "
                         "drop --adapter-only to export the whole model")
    model, tokenizer = _rebuild(cfg, ckpt)
    base = base_model_reference(cfg)
    card = model_card(cfg, ckpt.step, ckpt_dir, _results(ckpt, ckpt_dir), base, adapter_only)
    if adapter_only:
        return save_adapter_folder(model, tokenizer, out, base, card=card)
    return save_model_folder(merge_lora(model), tokenizer, out, card=card)


def base_model_reference(cfg: RunConfig) -> str:
    """What loads the run's base model: a Hugging Face id as it is, a folder (looprl/tiny's
    cached one included) as an absolute path."""
    path = resolve_model_path(cfg.model.name, cfg.model.tiny or None)
    return str(Path(path).resolve()) if Path(path).is_dir() else path


def save_model_folder(model, tokenizer, out: str | Path, card: str | None = None) -> Path:
    """Write a plain transformers `model` (no LoRA wrapper) and its tokenizer to `out`,
    atomically: the folder appears complete or not at all, replacing an empty one."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _write_folder(Path(out), write, card)


def save_adapter_folder(model, tokenizer, out: str | Path, base: str, card: str | None = None) -> Path:
    """Write a peft model's adapter (not the base weights) and the tokenizer to `out`, atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        config_path = tmp / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = base
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").unlink(missing_ok=True)  # peft's card template; ours replaces it
        tokenizer.save_pretrained(tmp)

    return _write_folder(Path(out), write, card)


def _write_folder(out: Path, write: Callable[[Path], None], card: str | None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write(tmp)
        make_transformers4_compatible(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
        _normal_permissions(tmp)  # mkdtemp makes 0700 (and some writers 0600): a model folder is shared
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def _normal_permissions(root: Path) -> None:
    """Folders 0777 and files 0666, less the umask (0755 and 0644 under the usual 022)."""
    mask = _umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


# --- transformers 4.x compatibility --------------------------------------------------------

def make_transformers4_compatible(folder: str | Path) -> None:
    """Rewrite the `config.json` and `tokenizer_config.json` that transformers 5 wrote in
    `folder` so that transformers 4.x reads the same model and tokenizer (5.x still does)."""
    folder = Path(folder)
    for name, convert in (("config.json", config_for_transformers4),
                          ("tokenizer_config.json", tokenizer_config_for_transformers4)):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            converted = convert(data)
            if converted != data:
                path.write_text(json.dumps(converted, indent=2, sort_keys=True) + "\n")


def config_for_transformers4(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with the RoPE and dtype fields also where transformers 4.x reads them.

    5.x keeps RoPE in `rope_parameters` (`rope_theta` and the scaling in one dict); 4.x
    reads a top-level `rope_theta`, `partial_rotary_factor` and `rope_scaling` (the scaling
    without the theta; none for the default type). 5.x reads those back into the same
    `rope_parameters`. Sub-configs (`text_config`, ...) are converted alike. A RoPE nested
    by layer type (Gemma 3's) gets its full- and sliding-attention thetas (`rope_theta`,
    `rope_local_base_freq`) but no `rope_scaling`: 5.x would read a flat one in place of
    the nested dict.
    """
    config = {key: config_for_transformers4(value) if isinstance(value, dict) and "model_type" in value else value
              for key, value in config.items()}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if not any(isinstance(v, dict) for v in rope.values()):
            if "rope_theta" in rope:
                config.setdefault("rope_theta", rope["rope_theta"])
            if "partial_rotary_factor" in rope:
                config.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
            if rope.get("rope_type", "default") != "default":
                config.setdefault("rope_scaling", {k: v for k, v in rope.items()
                                                   if k not in ("rope_theta", "partial_rotary_factor")})
        else:
            for layer_type, key in (("full_attention", "rope_theta"), ("sliding_attention", "rope_local_base_freq")):
                if isinstance(rope.get(layer_type), dict) and "rope_theta" in rope[layer_type]:
                    config.setdefault(key, rope[layer_type]["rope_theta"])
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])  # 4.x before 4.56 reads only this name
    return config


def tokenizer_config_for_transformers4(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with its extra special tokens as 4.x reads them.

    5.x writes the additional special tokens as a list `extra_special_tokens`, which 4.x
    takes for its dict of named model-specific tokens (and fails on); 4.x reads them from
    `additional_special_tokens`, as 5.x also does when `extra_special_tokens` is absent.
    5.x's generic fast tokenizer class is named `PreTrainedTokenizerFast` in both.
    """
    config = dict(config)
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        additional = list(config.get("additional_special_tokens") or [])
        config["additional_special_tokens"] = additional + [t for t in extra if t not in additional]
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return config


# --- the model card ------------------------------------------------------------------------

def _results(ckpt: Checkpoint, ckpt_dir: Path) -> dict[str, Any]:
    """The run's evaluations of this checkpoint: its `results.json` when that is this
    checkpoint's, else what the checkpoint recorded."""
    run_dir = ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else None
    path = run_dir / "results.json" if run_dir is not None else None
    if path is not None and path.is_file():
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            results = None
        if isinstance(results, dict) and (results.get("rl") or {}).get("steps", ckpt.step) == ckpt.step:
            return results
    results = ckpt.extra.get("results")
    return results if isinstance(results, dict) else {}


def _cell(result: dict[str, Any] | None) -> str:
    if not result or "success_rate" not in result:
        return "-"
    return f"{result['success_rate']:.1%} ± {result.get('success_stderr', 0.0):.1%}"


def eval_table(results: dict[str, Any], step: int) -> str | None:
    """Held-out success, sampled and greedy, before and after RL, as a Markdown table (None: no evaluation)."""
    rows = [(label, results.get(tag) or {}) for tag, label in
            (("warmstart", "warm start (SFT), before RL"), ("final", f"after RL (step {step})"))]
    if not any(_cell(res.get(mode)) != "-" for _, res in rows for mode in ("sampled", "greedy")):
        return None
    lines = ["| policy | sampled | greedy |", "|---|---|---|"]
    lines += [f"| {label} | {_cell(res.get('sampled'))} | {_cell(res.get('greedy'))} |" for label, res in rows]
    if change := results.get("change"):
        cells = [describe_change(change[m]) if m in change else "-" for m in ("sampled", "greedy")]
        lines.append(f"| change (paired by task) | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def model_card(cfg: RunConfig, step: int, ckpt_dir: Path, results: dict[str, Any], base: str,
               adapter_only: bool) -> str:
    """The export's `README.md`: what it is, how it did on held-out tasks, how it was trained, how to load it."""
    hub_base = not Path(base).is_absolute()
    front = ["---", f"library_name: {'peft' if adapter_only else 'transformers'}",
             *([f"base_model: {base}"] if hub_base else []), "tags: [looprl, reinforcement-learning]", "---", ""]
    what = ("the LoRA adapter (PEFT) of" if adapter_only
            else "the policy (LoRA merged into the weights) of" if cfg.lora.enabled else "the policy of")
    lines = front + [
        f"# {cfg.name}", "",
        f"Exported by looprl: {what} run `{cfg.name}` at step {step} of {cfg.train.steps} "
        f"(checkpoint `{ckpt_dir}`), trained with {cfg.algorithm.name} on `{cfg.env.id}` "
        f"from `{cfg.model.name}`.", "",
        "## Held-out evaluation", "",
    ]
    table = eval_table(results, step)
    if table is None:
        lines += ["No held-out evaluation of this checkpoint was recorded (`eval.episodes=0`, or the run "
                  "has not finished).", ""]
    else:
        env_kwargs = {**cfg.env.kwargs, **cfg.eval.env_kwargs}
        lines += [f"Success rate ± standard error on {cfg.eval.episodes} held-out `{cfg.env.id}` tasks "
                  f"({', '.join(f'{k}={v}' for k, v in env_kwargs.items()) or 'default kwargs'}); sampled at "
                  f"temperature {cfg.rollout.temperature:g}, greedy at 0.", "", table, ""]
    lines += ["## Configuration", "",
              "The settings that differ from looprl's defaults (every field with its help: "
              "`looprl config show RECIPE`):", "", "```yaml",
              yaml.safe_dump(_nested(changed_settings(cfg)), sort_keys=False, width=100).rstrip() or "{}",
              "```", "", "## Loading", "", "```python"]
    if adapter_only:
        lines += ["from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"base = AutoModelForCausalLM.from_pretrained({base!r})",
                  'model = PeftModel.from_pretrained(base, "THIS_FOLDER")',
                  'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")', "```", "",
                  "vLLM: `vllm serve BASE --enable-lora --lora-modules NAME=THIS_FOLDER`."]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
                  'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")', "```", "",
                  "vLLM: `vllm serve THIS_FOLDER`; looprl: `looprl eval --model THIS_FOLDER` or "
                  "`looprl serve THIS_FOLDER`."]
    lines += ["", "It loads with transformers 4.57 and 5 alike; the chat template (`chat_template.jinja`) "
              "renders turns and tool calls as in training."]
    return "\n".join(lines) + "\n"


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested
