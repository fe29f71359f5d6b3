"""A resolved run config, field by field: value, default and help, by section.

`looprl config show RECIPE [key=value ...]` prints it (`settings`, `yaml_with_help`);
an export's model card lists the fields a run changed (`changed_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from looprl.config import RunConfig

RUN_SECTION = "run"  # the top-level fields (name, output_dir, seed, ...)


@dataclass(frozen=True)
class Setting:
    """One config field: its dotted key, value and default (as JSON values) and its help."""

    key: str
    value: Any
    default: Any
    help: str

    @property
    def changed(self) -> bool:
        return self.value != self.default

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]


@dataclass(frozen=True)
class SectionSettings:
    name: str  # `run` for the top-level fields
    help: str
    settings: list[Setting]


def settings(cfg: RunConfig) -> list[SectionSettings]:
    """Every field of `cfg`, grouped by section in the config's order, top-level fields first.

    An algorithm's defaults are its own config class's (GRPO's `clip_low` is 0.2), but
    `algorithm.name` defaults to the default algorithm's."""
    defaults = RunConfig().model_dump(mode="json")
    top = SectionSettings(RUN_SECTION, "the run", [])
    sections = [top]
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            section_defaults = type(value)().model_dump(mode="json")
            if name == "algorithm":
                section_defaults["name"] = defaults["algorithm"]["name"]
            sections.append(SectionSettings(name, field.description or "", _section(name, value, section_defaults)))
        else:
            top.settings.append(Setting(name, cfg.model_dump(mode="json")[name], defaults[name], field.description or ""))
    return sections


def _section(prefix: str, section: BaseModel, defaults: dict[str, Any]) -> list[Setting]:
    values = section.model_dump(mode="json")
    names = sorted(type(section).model_fields, key=lambda n: n != "name")  # an algorithm's name first
    return [Setting(f"{prefix}.{name}", values[name], defaults.get(name), type(section).model_fields[name].description
                    or "") for name in names]


def changed_settings(cfg: RunConfig) -> dict[str, Any]:
    """`{dotted key: value}` for the fields whose value is not their default."""
    return {s.key: s.value for section in settings(cfg) for s in section.settings if s.changed}


def format_value(value: Any) -> str:
    """A JSON value as one line of YAML (what a recipe or a `key=value` override would say)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def yaml_with_help(cfg: RunConfig, header: str = "") -> str:
    """The resolved config as a YAML recipe, each field's help (and the default of a
    changed one) in a comment: `load_config` reads it back to the same config."""
    lines = [f"# {line}" for line in header.splitlines()]
    for section in settings(cfg):
        indent = ""
        if section.name != RUN_SECTION:
            lines.append(f"{section.name}:  # {section.help}")
            indent = "  "
        for s in section.settings:
            note = f" (default: {format_value(s.default)})" if s.changed else ""
            lines.append(f"{indent}{s.name}: {format_value(s.value)}  # {s.help}{note}")
    return "\n".join(lines) + "\n"
