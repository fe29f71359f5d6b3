"""The built-in tiny model: a small Qwen2 causal LM and a tokenizer built locally.

Nothing is downloaded. The tokenizer is a byte-level BPE trained with `tokenizers` on
text from the built-in environments' expert episodes, with digits split one per token
(a tiny model cannot learn to copy numbers when "17" and " 1" are single tokens; see
shared/CPU-FACTS.md). The model is a standard `Qwen2ForCausalLM`, so the code path that
serves it also serves real models. Both are built deterministically from a `TinySpec`
and cached under `$LOOPRL_CACHE` (default `~/.cache/looprl`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

TINY_PREFIX = "looprl/tiny"
BUILD_VERSION = 3  # bump when the tokenizer corpus or template changes (3: SQL-v0 value pools)
# Environments whose expert episodes train the tokenizer, by default. Named, not "every
# registered environment": registering a new one must not silently change the tiny model.
# A recipe for another world names its own corpus (`model.tiny.corpus`).
DEFAULT_CORPUS = "looprl/Calc-v0"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added but not "special", as in Qwen2.5: they survive skip_special_tokens=True.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# A compact Hermes-style template: tools are listed by signature (a tiny model reads
# every token), assistant tool calls are `<tool_call>{json}</tool_call>`, consecutive
# tool results share one user turn, as in Qwen2.5's template.
# The end of a ChatML template's message loop, after its tool-result branch: assistant turns
# with Hermes `<tool_call>` blocks, every other role as a plain turn, the generation prompt.
# Shared by the built-in models' templates (here and `looprl.train.smollm2`).
OTHER_TURNS_TEMPLATE = (
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + (message.content or '') }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- set f = call.function if call.function is defined else call %}"
    "{{- '<tool_call>{\"name\": \"' + f.name + '\", \"arguments\": ' }}"
    "{{- (f.arguments if f.arguments is string else f.arguments | tojson) + '}</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


CHAT_TEMPLATE = (
    "{%- if messages and messages[0].role == 'system' %}"
    "{%- set system = messages[0].content %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- if system or tools %}"
    "{{- '<|im_start|>system\\n' + system }}"
    "{%- if tools %}{{- '\\nTools:' }}{%- for tool in tools %}"
    "{%- set f = tool.function if tool.function is defined else tool %}"
    "{{- ' ' + f.name + '(' + (f.parameters.properties | list | join(', ')) + ')' }}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user\\n' }}{%- endif %}"
    "{{- '<tool_response>' + message.content + '</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    + OTHER_TURNS_TEMPLATE
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of the built-in tiny model. Every field changes the cache key."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    init_seed: int = 0
    corpus: str = DEFAULT_CORPUS  # comma-separated environment ids

    def __post_init__(self) -> None:
        from looprl.envs import env_ids

        unknown = [e for e in self.corpus_envs if e not in env_ids()]
        if unknown or not self.corpus_envs:
            raise ValueError(
                f"tiny.corpus names unknown environment(s) {unknown or [self.corpus]}; "
                f"expected ids from {env_ids()}"
            )

    @property
    def corpus_envs(self) -> tuple[str, ...]:
        return tuple(e.strip() for e in self.corpus.split(",") if e.strip())

    def key(self) -> str:
        fields = asdict(self)
        if self.corpus == DEFAULT_CORPUS:
            del fields["corpus"]  # keeps the cache key of models built before it existed
        blob = json.dumps({**fields, "build": BUILD_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_dir() -> Path:
    return Path(os.environ.get("LOOPRL_CACHE", Path.home() / ".cache" / "looprl"))


def tiny_path(spec: TinySpec) -> Path:
    """Build the tiny model for `spec` if it is not cached yet; return its folder."""
    return build_once(cache_dir() / "models" / f"tiny-{spec.key()}", lambda out: _build(spec, out))


def build_once(path: Path, build: Callable[[Path], None]) -> Path:
    """`path`, a model folder that `build(folder)` writes, built if it is not there yet.

    One builder at a time (the ranks of a torchrun job all ask at once): the others wait
    on a lock and find the folder built. It is built aside and renamed into place, so a
    reader sees the whole folder or none, and a killed builder leaves nothing half-made.
    """
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "config.json").exists():
            return path
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            build(tmp)
            shutil.rmtree(path, ignore_errors=True)  # a folder a killed builder left without its config
            os.replace(tmp, path)  # atomic: a reader sees the whole folder or none
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _build(spec: TinySpec, out: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer(spec.vocab_size, spec.corpus_envs)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        model = Qwen2ForCausalLM(config)
    # Neutral sampling defaults: what the engine samples must be what it records.
    model.generation_config.update(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tokenizer(vocab_size: int, corpus_envs: tuple[str, ...] = (DEFAULT_CORPUS,)):
    """Train the byte-level BPE on expert episodes of `corpus_envs`; wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + TOOL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(corpus_envs), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def _corpus(corpus_envs: tuple[str, ...]) -> list[str]:
    """Text of expert episodes in `corpus_envs`, plus plain ASCII."""
    from looprl.envs import make_env

    texts = [" ".join(chr(c) for c in range(32, 127))]
    for env_id in corpus_envs:
        for seed in range(300):
            env = make_env(env_id)
            obs, info = env.reset(seed=seed)
            texts += [m["content"] for m in info["messages"]]
            for _ in range(64):
                action = env.unwrapped.oracle_action()
                obs, _, terminated, truncated, info = env.step(action)
                texts += [action] + [m["content"] for m in info["messages"]]
                if terminated or truncated:
                    break
            env.close()
    return texts
