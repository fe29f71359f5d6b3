"""The apps' APIs: their documentation, argument checks, and dispatch.

Each API is declared once with a compact signature (`"contact_id: int, name?: str"`,
`?` marking an optional argument), a one-line description and the function that runs
it. `call(world, app, api, args)` checks the arguments against the signature, runs the
function, and returns `(result, ok)`; every problem comes back as an `ApiError`
message, never as an exception. Functions check everything before they change the
world, so a failed call changes nothing, and read-only APIs never change it at all.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from looprl.envs.apps.world import APPS, find

MAX_STR = 100
MAX_TEXT = 2000
MAX_AMOUNT = 10_000
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TIME = re.compile(r"([01]\d|2[0-3]):[0-5]\d")
# Kinds that the argument checks tell apart but the docs show as the same JSON type.
SHOWN_KINDS = {
    "query": "str",
    "text": "str",
    "amount": "number",
    "date": "YYYY-MM-DD",
    "time": "HH:MM",
}
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


class ApiError(Exception):
    """A bad API call; its message is what the agent reads."""


@dataclass(frozen=True)
class Param:
    """One API argument: `kind` is a type name or `a|b|c` for a choice."""

    name: str
    kind: str
    required: bool


@dataclass(frozen=True)
class Api:
    """One API of one app."""

    app: str
    name: str
    params: tuple[Param, ...]
    description: str
    fn: Callable[[dict[str, Any], dict[str, Any]], Any]
    writes: bool

    @property
    def signature(self) -> str:
        """`arg: kind, opt?: kind`, with kinds as the docs show them."""
        return ", ".join(
            f"{p.name}{'' if p.required else '?'}: {SHOWN_KINDS.get(p.kind, p.kind)}"
            for p in self.params
        )

    @property
    def doc(self) -> str:
        """`name(signature): description`, one line."""
        return f"{self.name}({self.signature}): {self.description}"


APIS: dict[str, dict[str, Api]] = {app: {} for app in APPS}  # in the order the docs list


def api(app: str, name: str, signature: str, description: str, writes: bool = False) -> Callable:
    """Decorator declaring `fn(world, args)` as the API `app.name`."""

    def declare(fn: Callable[[dict[str, Any], dict[str, Any]], Any]) -> Callable:
        params = tuple(_param(p.strip()) for p in signature.split(",") if p.strip())
        APIS[app][name] = Api(app, name, params, description, fn, writes)
        return fn

    return declare


def _param(text: str) -> Param:
    name, kind = (part.strip() for part in text.split(":"))
    return Param(name.rstrip("?"), kind, not name.endswith("?"))


def docs(app: str | None) -> str:
    """The API list of `app`, or the list of apps when `app` is None or unknown."""
    if app not in APIS:
        unknown = "" if app is None else f"Error: unknown app {show(app)}. "
        return f"{unknown}Apps: {', '.join(APIS)}. Call api_docs(app) to list an app's APIs."
    lines = [f'{app} APIs, for call_api(app="{app}", api=<name>, args={{...}}); ? = optional:']
    return "\n".join(lines + [a.doc for a in APIS[app].values()])


def call(world: dict[str, Any], app: str, name: str, args: dict[str, Any]) -> Any:
    """Runs the API `app.name` on `world` with `args`.

    Raises:
        ApiError: An unknown app or API, bad arguments, or a call the API refuses
            (a missing id, too small a balance, ...); the world is then unchanged.
    """
    if app not in APIS:
        raise ApiError(f"unknown app {show(app)}; apps: {', '.join(APIS)}")
    if name not in APIS[app]:
        known = ", ".join(APIS[app])
        raise ApiError(f'{app} has no API {show(name)}; its APIs: {known} (see api_docs("{app}"))')
    spec = APIS[app][name]
    _check_args(spec, args)
    return spec.fn(world, args)


def is_read_only(app: str, name: str) -> bool:
    """Whether `app.name` is a known API that never changes the world."""
    spec = APIS.get(app, {}).get(name)
    return spec is not None and not spec.writes


def _check_args(spec: Api, args: dict[str, Any]) -> None:
    expected = f"expected args: {spec.signature or 'none'}"
    kinds = {p.name: p.kind for p in spec.params}
    for key in args:
        if key not in kinds:
            raise ApiError(f"{spec.app}.{spec.name} got unknown arg {show(key)}; {expected}")
    for p in spec.params:
        if p.required and p.name not in args:
            raise ApiError(f"{spec.app}.{spec.name} is missing arg {p.name!r}; {expected}")
    for key, value in args.items():
        problem = _kind_problem(kinds[key], value)
        if problem is not None:
            raise ApiError(f"arg {key!r} {problem}, got {show(value)}")


def _kind_problem(kind: str, value: Any) -> str | None:
    """What is wrong with `value` for an argument of `kind`, or None."""
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "must be an integer id"
    if kind == "amount":
        return _amount_problem(value)
    if not isinstance(value, str):
        return f"must be a string ({kind})"
    checks: dict[str, tuple[bool, str]] = {
        "str": (0 < len(value.strip()) and len(value) <= MAX_STR, f"must be 1-{MAX_STR} chars"),
        "query": (len(value) <= MAX_STR, f"must be at most {MAX_STR} chars"),
        "text": (len(value) <= MAX_TEXT, f"must be at most {MAX_TEXT} chars"),
        "date": (_is_date(value), "must be a date YYYY-MM-DD"),
        "time": (bool(_TIME.fullmatch(value)), "must be a time HH:MM (24h)"),
        "email": (len(value) <= MAX_STR and bool(_EMAIL.fullmatch(value)), "must be an email"),
    }
    ok, problem = checks.get(kind, (value in kind.split("|"), f"must be one of {kind}"))
    return None if ok else problem


def _amount_problem(value: Any) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "must be a number"
    if not 0 < value <= MAX_AMOUNT:  # also false for nan and inf
        return f"must be > 0 and <= {MAX_AMOUNT}"
    if abs(round(value, 2) - value) > 1e-9:
        return "must have at most 2 decimals"
    return None


def _is_date(value: str) -> bool:
    if not _DATE.fullmatch(value):
        return False
    try:
        datetime.date.fromisoformat(value)
    except ValueError:
        return False
    return True


def show(value: Any) -> str:
    """A short rendering of model-written input, safe to echo back."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def get_record(world: dict[str, Any], collection: str, args: dict[str, Any], key: str) -> Any:
    """The record whose id is `args[key]`; raises `ApiError` naming the id if there is none."""
    record = find(world, collection, args[key])
    if record is None:
        raise ApiError(f"{key} {show(args[key])} not found")
    return record


def update_record(record: dict[str, Any], args: dict[str, Any], fields: tuple[str, ...]) -> Any:
    """Sets the `fields` given in `args` on `record`; at least one must be given."""
    changes = {k: args[k] for k in fields if k in args}
    if not changes:
        raise ApiError(f"nothing to update: give at least one of {', '.join(fields)}")
    record.update(changes)
    return record


def delete_record(world: dict[str, Any], collection: str, args: dict[str, Any], key: str) -> Any:
    """Removes the record whose id is `args[key]`."""
    world[collection].remove(get_record(world, collection, args, key))
    return {"deleted": args[key]}


def contains(text: str, query: str) -> bool:
    """Whether `query` occurs in `text`, ignoring case."""
    return query.casefold() in text.casefold()
