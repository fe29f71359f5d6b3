"""The built-in tiny model: deterministic, cached, a tokenizer that round-trips through
`AutoTokenizer`, a Hermes chat template; and `resolve_model_path`'s errors."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from looprl.envs import format_tool_call, parse_action
from looprl.train import tiny
from looprl.train.models import ModelLoadError, load_tokenizer, resolve_model_path
from looprl.train.tiny import TINY_PREFIX, TinySpec, build_tokenizer

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}

TEXTS = [
    "Compute 1234 + 56 * 7.",
    '<tool_call>{"name": "calculator", "arguments": {"expression": "12 / (3 - 1)"}}</tool_call>',
    '<|im_start|>user\n<tool_response>Error: no tool call found.</tool_response><|im_end|>\n',
    "unicode: héllo wörld — 你好 🙂 ∑x²",
    "  leading spaces, tabs\tand\nnewlines  ",
]


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    """The small tiny model built from scratch into two separate caches."""
    paths = []
    for name in ("cache-a", "cache-b"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LOOPRL_CACHE", str(tmp_path_factory.mktemp(name)))
            paths.append(resolve_model_path(TINY_PREFIX, SMALL))
    return paths


@pytest.fixture(scope="module")
def path(two_builds):
    return two_builds[0]


@pytest.fixture(scope="module")
def loaded_tokenizer(path):
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def fresh_tokenizer():
    """Built in memory, never saved."""
    return build_tokenizer(TinySpec(**SMALL).vocab_size)


def test_tiny_model_builds_deterministically(two_builds):
    a, b = two_builds
    assert a != b
    assert a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1] == f"tiny-{TinySpec(**SMALL).key()}"
    weights_a, weights_b = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    assert weights_a.keys() == weights_b.keys() and len(weights_a) > 0
    for name in weights_a:
        assert weights_a[name].equal(weights_b[name]), name
    with open(f"{a}/tokenizer.json", "rb") as fa, open(f"{b}/tokenizer.json", "rb") as fb:
        assert fa.read() == fb.read()


def test_tiny_model_is_cached(two_builds, monkeypatch):
    path = two_builds[0]
    config, weights = f"{path}/config.json", f"{path}/model.safetensors"
    mtimes = (os.stat(config).st_mtime_ns, os.stat(weights).st_mtime_ns)

    def no_rebuild(spec, out):
        raise AssertionError("the cached tiny model was rebuilt")

    monkeypatch.setattr(tiny, "_build", no_rebuild)
    monkeypatch.setenv("LOOPRL_CACHE", path.rsplit("/models/", 1)[0])
    assert resolve_model_path(TINY_PREFIX, SMALL) == path
    assert (os.stat(config).st_mtime_ns, os.stat(weights).st_mtime_ns) == mtimes


def _changed(value):
    return "looprl/Calc-v0,looprl/SQL-v0" if isinstance(value, str) else value + 1


def test_every_spec_field_changes_the_cache_key():
    base = TinySpec()
    keys = {base.key()} | {TinySpec(**{f: _changed(getattr(base, f))}).key() for f in base.__dataclass_fields__}
    assert len(keys) == 1 + len(base.__dataclass_fields__)


def test_unknown_corpus_environment_is_refused():
    with pytest.raises(ModelLoadError, match=r"Bad model.tiny: tiny.corpus names unknown environment\(s\) \['looprl/Nope-v0'\]"):
        resolve_model_path(TINY_PREFIX, {"corpus": "looprl/Calc-v0, looprl/Nope-v0"})


def test_a_world_corpus_fits_that_world_better():
    """A tokenizer trained on SQL-v0's episodes encodes SQL in fewer tokens than Calc's."""
    from looprl.train.tiny import build_tokenizer

    sql = "SELECT name FROM authors WHERE country = 'India' ORDER BY name"
    calc, own = build_tokenizer(512), build_tokenizer(512, ("looprl/SQL-v0",))
    assert len(own.encode(sql)) < 0.6 * len(calc.encode(sql))
    assert own.decode(own.encode(sql)) == sql


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_through_autotokenizer(path, loaded_tokenizer, fresh_tokenizer, text):
    fresh = fresh_tokenizer
    assert isinstance(fresh, PreTrainedTokenizerFast)
    ids = fresh.encode(text, add_special_tokens=False)
    assert loaded_tokenizer.encode(text, add_special_tokens=False) == ids
    assert loaded_tokenizer.decode(ids) == fresh.decode(ids) == text
    assert (loaded_tokenizer.eos_token, loaded_tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    # The loader looprl uses gives the same tokenizer.
    assert load_tokenizer(path).encode(text, add_special_tokens=False) == ids


def test_digits_are_single_tokens(loaded_tokenizer):
    tok = loaded_tokenizer

    def encode(text):
        return tok.encode(text, add_special_tokens=False)

    digit_ids = [encode(d) for d in "0123456789"]
    assert all(len(ids) == 1 for ids in digit_ids)
    assert encode("1234") == digit_ids[1] + digit_ids[2] + digit_ids[3] + digit_ids[4]
    assert encode(" 5")[-1] == encode("5")[0]
    assert encode("x=17")[-2:] == digit_ids[1] + digit_ids[7]


def test_tool_tags_and_chat_markers_are_single_tokens(loaded_tokenizer):
    for marker in ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<|im_start|>", "<|im_end|>"]:
        assert len(loaded_tokenizer.encode(marker, add_special_tokens=False)) == 1, marker


TOOLS = [
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate.",
                                      "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "answer", "description": "Submit.",
                                      "parameters": {"type": "object", "properties": {"value": {"type": "number"}}}}},
]


def test_chat_template_renders_tools_and_tool_calls(loaded_tokenizer):
    messages = [
        {"role": "system", "content": "Use the calculator, then answer."},
        {"role": "user", "content": "Compute 2 + 1."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2 + 1"}}},
            {"type": "function", "function": {"name": "answer", "arguments": '{"value": 3}'}},
        ]},
        {"role": "tool", "name": "calculator", "content": "3"},
        {"role": "tool", "name": "answer", "content": "Correct."},
    ]
    text = loaded_tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    call = format_tool_call("calculator", {"expression": "2 + 1"})
    assert text == (
        "<|im_start|>system\nUse the calculator, then answer.\nTools: calculator(expression) answer(value)<|im_end|>\n"
        "<|im_start|>user\nCompute 2 + 1.<|im_end|>\n"
        "<|im_start|>assistant\n"
        f'{call}<tool_call>{{"name": "answer", "arguments": {{"value": 3}}}}</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>3</tool_response><tool_response>Correct.</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The env's parser reads back what the template wrote.
    assistant = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    parsed = parse_action(assistant)
    assert not parsed.errors
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("calculator", {"expression": "2 + 1"}), ("answer", {"value": 3})
    ]


def test_chat_template_without_tools_has_no_tools_line(loaded_tokenizer):
    text = loaded_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"


def test_missing_local_path_is_named(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="does not exist") as e:
        resolve_model_path(missing)
    assert repr(missing) in str(e.value)
    with pytest.raises(ModelLoadError, match=r"'\./nope' does not exist"):
        resolve_model_path("./nope")


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({}))
    with pytest.raises(ModelLoadError, match="has no config.json") as e:
        resolve_model_path(str(tmp_path))
    assert repr(str(tmp_path)) in str(e.value)


def test_unknown_tiny_field_is_refused():
    with pytest.raises(ModelLoadError, match=r"Unknown tiny-model field\(s\) \['hidden'\]") as e:
        resolve_model_path(TINY_PREFIX, {"hidden": 32})
    assert "hidden_size" in str(e.value)  # says what was expected


def test_tiny_fields_with_a_non_tiny_name_are_refused():
    with pytest.raises(ModelLoadError, match="model.tiny is only for 'looprl/tiny', but model.name is 'Qwen/Qwen2.5-0.5B'"):
        resolve_model_path("Qwen/Qwen2.5-0.5B", {"hidden_size": 32})


def test_hub_ids_pass_through_without_download():
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
