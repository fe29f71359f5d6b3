"""The typed, strict run config: every recipe loads; bad keys and values are named."""

from pathlib import Path

import pytest
import yaml

from looprl.config import ConfigError, RunConfig, load_config, to_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NOT_RECIPES = {"deepspeed", "accelerate"}  # launcher configs, if any, are not run recipes
QUICKSTART = CONFIGS / "quickstart.yaml"


def _recipes() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("**/*.yaml") if not NOT_RECIPES & set(p.relative_to(CONFIGS).parts[:-1]))


def test_every_recipe_under_configs_loads():
    recipes = _recipes()
    assert QUICKSTART in recipes
    for path in recipes:
        assert isinstance(load_config(path), RunConfig), path


def test_recipe_values_are_read_as_written():
    raw = yaml.safe_load(QUICKSTART.read_text())
    cfg = load_config(QUICKSTART)
    assert cfg.name == raw["name"]
    assert cfg.lora.enabled == raw["lora"]["enabled"]
    assert cfg.optim.lr == float(raw["optim"]["lr"])
    assert cfg.env.kwargs == raw["env"]["kwargs"]
    # Fields the recipe leaves out keep their documented defaults.
    assert cfg.algorithm.adv_threshold == RunConfig().algorithm.adv_threshold


@pytest.mark.parametrize("override, key", [
    ("nope=1", "'nope'"),
    ("algorithm.clip_epsilon=0.2", "'algorithm.clip_epsilon'"),
    ("model.tiny_size=3", "'model.tiny_size'"),
])
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=f"unknown key {key}"):
        load_config(QUICKSTART, [override])


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  group_sise: 4\n")
    with pytest.raises(ConfigError, match="unknown key 'rollout.group_sise'"):
        load_config(path)


@pytest.mark.parametrize("override, expected", [
    ("rollout.group_size=six", "rollout.group_size: Input should be a valid integer (got 'six')"),
    ("optim.lr=abc", "optim.lr: Input should be a valid number (got 'abc')"),
    ("lora.enabled=maybe", "lora.enabled: Input should be a valid boolean (got 'maybe')"),
    ("rollout.group_size=1", "rollout.group_size: Input should be greater than or equal to 2 (got 1)"),
    ("algorithm.ratio_level=step", "algorithm.ratio_level: Input should be 'token', 'turn' or 'trajectory'"),
    ("rollout.turn_wait_s=-1", "rollout.turn_wait_s: Input should be greater than or equal to 0 (got -1)"),
    ("train.zero_stage=4", "train.zero_stage: Input should be 1, 2 or 3 (got 4)"),
    ("train.backend=zero3", "train.backend: Input should be 'auto', 'single', 'fsdp2' or 'deepspeed' (got 'zero3')"),
])
def test_bad_value_names_key_path_and_expectation(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, [override])
    assert expected in str(info.value)


def test_a_shared_prefix_without_the_prefix_cache_is_refused():
    with pytest.raises(ConfigError, match="rollout.shared_prefix=true needs the hf engine's own decoding"):
        load_config(QUICKSTART, ["rollout.shared_prefix=true"])  # the quickstart decodes through model.generate
    assert load_config(QUICKSTART, ["rollout.shared_prefix=true", "rollout.prefix_cache=true"]).rollout.shared_prefix


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(QUICKSTART, [
        "algorithm.clip_eps=0.2", "eval.greedy=false", "model.tiny.hidden_size=64",
        "lora.target_modules=[q_proj,v_proj]", "optim.betas=[0.9,0.95]", "name=exp 1",
    ])
    assert cfg.algorithm.clip_eps == 0.2 and isinstance(cfg.algorithm.clip_eps, float)
    assert cfg.eval.greedy is False
    assert cfg.model.tiny == {"hidden_size": 64}
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.name == "exp 1"
    assert cfg.rollout.group_size == 6  # untouched keys keep the recipe's value


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # PyYAML's YAML 1.1 rules read `1e-4` as a string; the strict float field would reject it.
    assert load_config(QUICKSTART, ["optim.lr=1e-4"]).optim.lr == 1e-4
    path = tmp_path / "lr.yaml"
    path.write_text("optim:\n  lr: 2e-5\nsft:\n  lr: 1E-3\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.sft.lr) == (2e-5, 1e-3)


@pytest.mark.parametrize("override", ["foo", "=3", "a..b=1", ".a=1", "a.=1"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match=r"is not of the form key\.path=value"):
        load_config(None, [override])


def test_override_below_a_non_section_is_an_error():
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        load_config(QUICKSTART, ["seed.value=1"])


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"Config file '{missing}' does not exist"):
        load_config(missing)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping, got list"):
        load_config(path)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("rollout: {group_size: 4\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)


def test_an_empty_yaml_is_refused_not_run_on_all_defaults(tmp_path):
    # Issue 20 changed this: an empty recipe used to run silently on every default.
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(path)
    assert load_config(None) == RunConfig()  # no recipe at all: the defaults, as before


def test_to_yaml_round_trip(tmp_path):
    cfg = load_config(QUICKSTART, ["optim.betas=[0.8,0.9]", "sft.max_seconds=30", "optim.lr=1e-5",
                                   "lora.target_modules=[q_proj]", "model.tiny.hidden_size=64"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg
    assert load_config(path) != load_config(QUICKSTART)  # the comparison sees the overrides


@pytest.mark.parametrize("overrides, expected", [
    (["rollout.mode=async", "rollout.decoupled_loss=true", "rollout.recompute_logprobs=true"],
     "set rollout.recompute_logprobs=false"),
    (["rollout.decoupled_loss=true"], "rollout.decoupled_loss=true corrects for stale asynchronous rollouts"),
    (["rollout.recompute_logprobs=true"], "rollout.recompute_logprobs=true corrects for stale asynchronous rollouts"),
    (["rollout.mode=async", "rollout.decoupled_loss=true", "rollout.behaviour_weight_cap=0.5"],
     "rollout.behaviour_weight_cap: Input should be greater than 1"),
])
def test_off_policy_corrections_are_checked_when_the_config_is_read(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(QUICKSTART, overrides)
    load_config(QUICKSTART, ["rollout.mode=async", "rollout.decoupled_loss=true"])


@pytest.mark.parametrize("overrides", [
    ["rollout.mode=async", "rollout.ray_pin_cpus=true"],
    ["rollout.mode=async", "rollout.backend=ray", "rollout.ray_address=auto", "rollout.ray_pin_cpus=true"],
])
def test_pinned_cpus_need_a_local_ray_cluster(overrides):
    with pytest.raises(ConfigError, match="rollout.ray_pin_cpus=true splits this machine's cores"):
        load_config(QUICKSTART, overrides)
    load_config(QUICKSTART, ["rollout.mode=async", "rollout.backend=ray", "rollout.ray_pin_cpus=true"])


@pytest.mark.parametrize("overrides, expected", [
    (["algorithm.packing=true", "train.sequence_parallel=2"], "algorithm.packing=true packs whole rows on one rank"),
    (["algorithm.packing=true", "train.sequence_parallel_adaptive=true"],
     "algorithm.packing=true packs whole rows on one rank"),
])
def test_packing_is_for_the_policy_gradient_update_on_whole_rows(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(QUICKSTART, overrides)
    assert load_config(QUICKSTART, ["algorithm.packing=true"]).algorithm.packing
