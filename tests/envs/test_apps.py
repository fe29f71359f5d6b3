"""`looprl/Apps-v0`: world, APIs, state-based check, oracle, split, settings, fuzz."""

from __future__ import annotations

import copy
import doctest
import json
import math
import random
import string

import gymnasium
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import looprl.envs  # noqa: F401 — registers looprl/Apps-v0
from looprl.envs import format_tool_call, parse_action
from looprl.envs.apps import AppsEnv, apis, check
from looprl.envs.apps.check import contains_all, diff, mismatch, number_answer, same
from looprl.envs.apps.tasks import TEMPLATES, generate, split_of
from looprl.envs.apps.world import APPS, COLLECTIONS, build_world


def make(**kwargs) -> AppsEnv:
    return gymnasium.make("looprl/Apps-v0", **kwargs).unwrapped


def started(template: str, level: int, split: str = "train", **kwargs) -> AppsEnv:
    """An env on the first task (by seed) of `template` in `split`."""
    env = make(split=split, **kwargs)
    for seed in range(10_000):
        task = generate(seed, level)
        if task is not None and task.spec.template == template and task.split == split:
            env.reset(options={"task": task.task_id})
            return env
    raise AssertionError(f"no {template} task")


def api(env: AppsEnv, app: str, name: str, **args) -> str:
    return env.step(format_tool_call("call_api", {"app": app, "api": name, "args": args}))[0]


def complete(env: AppsEnv, answer=None) -> tuple[str, float]:
    arguments = {} if answer is None else {"answer": answer}
    obs, reward, terminated, _, _ = env.step(format_tool_call("complete_task", arguments))
    assert terminated
    return obs, reward


def play_oracle(env: AppsEnv, stop_before: str | None = None) -> tuple[list[str], float]:
    """Plays the oracle to the end (or until it would call `stop_before`)."""
    actions, total, done = [], 0.0, False
    while not done:
        action = env.oracle_action()
        if stop_before is not None and f'"name": "{stop_before}"' in action:
            break
        actions.append(action)
        _, reward, terminated, truncated, _ = env.step(action)
        total, done = total + reward, terminated or truncated
    return actions, total


# --- world -------------------------------------------------------------------------------


def test_worlds_are_deterministic_json_and_of_the_promised_size():
    first, again = build_world(random.Random(3)), build_world(random.Random(3))
    assert first == again and first != build_world(random.Random(4))
    assert json.loads(json.dumps(first)) == first
    for seed in range(50):
        world = build_world(random.Random(seed))
        ids = [r["id"] for name in COLLECTIONS for r in world[name]]
        assert len(ids) == len(set(ids)) and world["next_id"] > max(ids)
        assert 10 <= len(world["contacts"]) <= 19
        assert len({c["name"] for c in world["contacts"]}) == len(world["contacts"])
        assert all(world[name] for name in COLLECTIONS)


# --- APIs --------------------------------------------------------------------------------


def test_api_docs_lists_apps_then_an_apps_apis():
    env = started("email_contact", 2)
    assert env.step(format_tool_call("api_docs", {}))[0] == (
        "Apps: contacts, calendar, email, notes, files, payments. "
        "Call api_docs(app) to list an app's APIs."
    )
    obs = env.step(format_tool_call("api_docs", {"app": "bank"}))[0]
    assert obs.startswith("Error: unknown app 'bank'. Apps: contacts, calendar")
    obs = env.step(format_tool_call("api_docs", {"app": "payments"}))[0]
    assert obs.splitlines() == [
        'payments APIs, for call_api(app="payments", api=<name>, args={...}); ? = optional:',
        "balance(): your balance",
        "list(since?: YYYY-MM-DD, dir?: in|out, with?: str): payments, newest first; since: on "
        "or after that date; dir: in = received, out = sent; with: part of the other party's "
        "email",
        "send(to: email, amount: number, note?: str): pay a contact (to: their email); returns "
        "the payment id and new balance",
    ]
    assert list(apis.APIS) == list(APPS) and sum(len(a) for a in apis.APIS.values()) == 26


def test_calls_return_compact_json_and_writes_persist():
    env = started("email_contact", 2)
    contact = env.world["contacts"][0]
    found = json.loads(api(env, "contacts", "search", query=contact["name"]))
    assert contact in found
    assert api(env, "contacts", "get", contact_id=contact["id"]) == json.dumps(
        contact, separators=(",", ":")
    )
    sent = json.loads(api(env, "email", "send", to=contact["email"], subject="Hi", body="Yo"))
    summary = json.loads(api(env, "email", "list", folder="sent"))
    assert sent["id"] in [e["id"] for e in summary] and "body" not in summary[0]
    assert json.loads(api(env, "email", "read", email_id=sent["id"]))["body"] == "Yo"


@pytest.mark.parametrize(
    ("app", "name", "args", "message"),
    [
        ("contacts", "get", {"contact_id": 99999}, "Error: contact_id 99999 not found"),
        ("bank", "send", {}, "Error: unknown app 'bank'; apps: contacts, calendar, email"),
        ("payments", "sned", {}, "Error: payments has no API 'sned'; its APIs: balance, list"),
        ("notes", "list", {"x": 1}, "Error: notes.list got unknown arg 'x'; expected args: none"),
        ("payments", "send", {"to": "a@b.c"}, "Error: payments.send is missing arg 'amount'"),
        ("files", "move", {"file_id": True, "folder": "x"}, "Error: arg 'file_id' must be an integer id, got True"),
        ("payments", "send", {"to": "a@b.c", "amount": -5}, "Error: arg 'amount' must be > 0 and <= 10000, got -5"),
        ("payments", "send", {"to": "a@b.c", "amount": 10**30}, "Error: arg 'amount' must be > 0"),
        ("payments", "send", {"to": "a@b.c", "amount": float("nan")}, "Error: arg 'amount' must be > 0"),
        ("payments", "send", {"to": "a@b.c", "amount": float("inf")}, "Error: arg 'amount' must be > 0"),
        ("payments", "send", {"to": "a@b.c", "amount": 5.555}, "Error: arg 'amount' must have at most 2 decimals"),
        ("payments", "send", {"to": "a@b.c", "amount": "5"}, "Error: arg 'amount' must be a number"),
        ("payments", "send", {"to": "a@b.c", "amount": 5}, "Error: no contact has the email a@b.c"),
        ("payments", "send", {"to": "not-an-email", "amount": 5}, "Error: arg 'to' must be an email"),
        ("notes", "create", {"title": "x", "body": "y" * 2001}, "Error: arg 'body' must be at most 2000 chars"),
        ("notes", "create", {"title": "  ", "body": "y"}, "Error: arg 'title' must be 1-100 chars"),
        ("calendar", "add", {"title": "x", "date": "2024-02-30", "time": "10:00"}, "Error: arg 'date' must be a date YYYY-MM-DD"),
        ("calendar", "add", {"title": "x", "date": "2024-02-03", "time": "25:00"}, "Error: arg 'time' must be a time HH:MM"),
        ("calendar", "add", {"title": "x", "date": "2024-02-03", "time": "10:00", "mins": -4},
         "Error: arg 'mins' must be between 5 and 1440, got -4"),
        ("contacts", "search", {"group": "enemies"}, "Error: arg 'group' must be one of family|friends|work"),
        ("contacts", "update", {"contact_id": 1}, "Error: nothing to update: give at least one of name"),
        ("files", "list", {"folder": "Nope"}, "Error: folder 'Nope' not found; folders: "),
    ],
)  # fmt: skip
def test_bad_calls_are_errors_the_agent_reads_and_change_nothing(app, name, args, message):
    env = started("email_contact", 2)
    before = copy.deepcopy(env.world)
    assert api(env, app, name, **args).startswith(message)
    assert env.world == before


def test_payments_refuse_more_than_the_balance_and_move_money_to_the_cent():
    env = started("pay_contact", 2)
    contact, balance = env.world["contacts"][0], env.world["balance"]
    assert api(env, "payments", "send", to=contact["email"], amount=10_000).startswith(
        "Error: insufficient balance"
    )
    result = json.loads(api(env, "payments", "send", to=contact["email"], amount=0.1))
    assert result["balance"] == round(balance - 0.1, 2) == env.world["balance"]


def test_read_only_apis_never_change_the_world():
    env = started("share_event", 3, max_turns=1000)
    before = copy.deepcopy(env.world)
    reads = [(a, n) for a, specs in apis.APIS.items() for n, s in specs.items() if not s.writes]
    assert len(reads) == 11
    for app, name in reads:
        spec = apis.APIS[app][name]
        args = {p.name: 1 if p.kind == "int" else "2024-05-15" for p in spec.params if p.required}
        api(env, app, name, **args)
        for record_id in range(1, 120):
            if spec.params and spec.params[0].kind == "int":
                api(env, app, name, **{spec.params[0].name: record_id})
    assert env.world == before


# --- state-based check ----------------------------------------------------------------------


def test_diff_lists_added_removed_and_changed_records():
    before = build_world(random.Random(0))
    after = copy.deepcopy(before)
    apis.call(after, "notes", "create", {"title": "T", "body": "B"})
    apis.call(after, "files", "delete", {"file_id": after["files"][0]["id"]})
    event = after["events"][0]
    apis.call(after, "calendar", "update", {"event_id": event["id"], "time": "23:59"})
    assert diff(before, after) == {
        "notes": {"added": [{"title": "T", "body": "B"}], "removed": [], "changed": {}},
        "files": {"added": [], "removed": [before["files"][0]["id"]], "changed": {}},
        "events": {"added": [], "removed": [], "changed": {event["id"]: {"time": "23:59"}}},
    }
    assert diff(before, before) == {}


def test_mismatch_names_collateral_and_missing_changes():
    before = build_world(random.Random(0))
    wanted, extra = copy.deepcopy(before), copy.deepcopy(before)
    apis.call(wanted, "notes", "create", {"title": "T", "body": "B"})
    apis.call(extra, "notes", "create", {"title": " t ", "body": "b."})
    expected = diff(before, wanted)
    assert mismatch(diff(before, extra), expected, {}) is None  # same up to case and spacing
    apis.call(extra, "notes", "delete", {"note_id": before["notes"][0]["id"]})
    assert mismatch(diff(before, extra), expected, {}) == (
        f"notes: removed ids [{before['notes'][0]['id']}], expected []"
    )
    assert mismatch(diff(before, before), expected, {}) == "missing change to notes"
    apis.call(wanted, "notes", "create", {"title": "T", "body": "B"})
    assert mismatch(diff(before, wanted), expected, {}) == "notes: unexpected records were added"
    assert same(10.004, 10) and not same(True, 1) and not same("a", "b")


def test_check_doctests_pass():
    assert doctest.testmod(check).failed == 0


def test_answer_checks():
    check = number_answer(45.2)
    assert [check(a) for a in ("45.20", "$45.2", " 45.2 dollars", "45", None, "45.2 or 46")] == [
        True, True, True, False, False, False,
    ]  # fmt: skip
    assert contains_all(["555-1234", "555-9"])("Ana: 555-1234\nBob: 555-9")
    assert not contains_all(["555-1234"])(42)


def test_collateral_changes_fail_the_task():
    env = started("pay_contact", 2)
    note = env.world["notes"][0]["id"]
    api(env, "notes", "delete", note_id=note)  # not asked for
    play_oracle(env, stop_before="complete_task")
    assert complete(env) == ("Task failed: unexpected change to notes.", 0.0)


def test_doing_the_work_twice_fails_and_answers_are_checked():
    env = started("pay_contact", 2)
    actions, _ = play_oracle(env, stop_before="complete_task")
    env.step(actions[-1])  # the payment again
    assert complete(env)[1] == 0.0
    env = started("total_paid", 2)
    play_oracle(env, stop_before="complete_task")
    assert complete(env, "1234567.89") == ("Task failed: wrong answer.", 0.0)
    env = started("total_paid", 2)
    play_oracle(env, stop_before="complete_task")
    assert complete(env, float(env.task.spec.answer)) == ("Task completed.", 1.0)


def test_a_note_in_another_layout_passes():
    env = started("group_note", 2)
    spec = env.task.spec
    group, key, title = spec.params["group"], spec.params["field"], spec.params["title"]
    values = [c[key] for c in env.world["contacts"] if c["group"] == group]
    api(env, "notes", "create", title=title.upper(), body="; ".join(reversed(values)))
    assert complete(env) == ("Task completed.", 1.0)


# --- oracle ----------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_oracle_solves_500_tasks_of_each_split(split):
    env = make(split=split)
    levels = set()
    for seed in range(500):
        env.reset(seed=seed)
        levels.add(env.task.level)
        assert play_oracle(env)[1] == 1.0, env.task.task_id
    assert levels == {1, 2, 3}


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_oracle_solves_every_template_with_2_to_10_calls(difficulty):
    env = make(difficulty=difficulty)
    seen, lengths = set(), set()
    for seed in range(150):
        env.reset(seed=seed)
        actions, total = play_oracle(env)
        seen.add(env.task.spec.template)
        lengths.add(len(actions))
        assert total == 1.0 and env.task.level == difficulty
    assert seen == {t.__name__ for t in TEMPLATES[difficulty]}
    assert 3 <= min(lengths) and max(lengths) <= 10


def test_oracle_reads_each_apps_docs_once_before_calling_it():
    env = started("share_event", 3)
    actions, _ = play_oracle(env)
    calls = [parse_action(a).tool_calls[0] for a in actions]
    assert [c.arguments.get("app") for c in calls[:3]] == ["calendar", "contacts", "email"]
    assert [c.name for c in calls] == ["api_docs"] * 3 + ["call_api"] * 3 + ["complete_task"]


def test_oracle_resumes_after_a_replay_and_after_detours():
    env = started("email_group", 3)
    task_id = env.task.task_id
    actions, _ = play_oracle(env)
    for cut in range(len(actions)):
        junk = [format_tool_call("call_api", {"app": "notes", "api": "list"}), "hmm"]
        history = actions[:cut] + junk
        env.reset(options={"task": task_id, "history": history})
        assert env.oracle_action() == actions[cut]
        assert play_oracle(env)[1] == 1.0


def test_oracle_completes_when_the_world_is_off_its_script():
    env = started("move_file", 1)
    file_id = env.task.spec.calls[-1][2]["file_id"]
    api(env, "files", "delete", file_id=file_id)
    actions, total = play_oracle(env)
    assert '"complete_task"' in actions[-1] and total == 0.0 and len(actions) == 4


def test_oracle_after_the_end_raises():
    env = started("delete_note", 1)
    play_oracle(env)
    with pytest.raises(RuntimeError, match="The episode is over"):
        env.oracle_action()


# --- policies that should not succeed ----------------------------------------------------------


def test_completing_at_once_or_random_text_solves_nothing():
    env = make()
    rng = np.random.default_rng(0)
    for seed in range(300):
        env.reset(seed=seed)
        if seed % 2:
            assert complete(env)[1] == 0.0, env.task.task_id
            continue
        total, done = 0.0, False
        while not done:
            text = "".join(rng.choice(list(string.printable), size=int(rng.integers(0, 80))))
            _, reward, terminated, truncated, _ = env.step(text)
            total, done = total + reward, terminated or truncated
        assert truncated and total == 0.0


def test_observations_stay_compact():
    env = make()
    longest = 0
    for seed in range(200):
        env.reset(seed=seed)
        while True:
            obs, _, terminated, truncated, _ = env.step(env.oracle_action())
            longest = max(longest, len(obs))
            if terminated or truncated:
                break
    assert longest < 2500


# --- tasks, split and settings --------------------------------------------------------------


def test_train_and_test_tasks_are_disjoint_by_content():
    contents = {}
    for split in ("train", "test"):
        env = make(split=split)
        contents[split] = set()
        for seed in range(600):
            env.reset(seed=seed)
            spec = env.task.spec
            assert split_of(spec.template, spec.params) == split
            contents[split].add((spec.template, json.dumps(spec.params, sort_keys=True)))
    assert len(contents["train"]) > 250 and len(contents["test"]) > 150
    assert not contents["train"] & contents["test"]


def test_task_option_restores_the_task_and_its_world():
    env = make()
    _, info = env.reset(seed=5)
    prompt, world = env.task.prompt, copy.deepcopy(env.world)
    api(env, "notes", "create", title="x", body="y")
    obs, again = make().reset(options={"task": info["task_id"]})
    assert (obs, again["task_id"]) == (prompt, info["task_id"])
    env.reset(options={"task": info["task_id"]})
    assert env.world == world


@pytest.mark.parametrize(
    ("task_id", "kwargs", "message"),
    [
        ("calc:1 + 2", {}, "is not an Apps task id; expected 'apps:<level 1-3>:<seed"),
        ("apps:4:1:add_event", {}, "is not an Apps task id"),
        ("apps:1:99999999999:add_event", {}, "is not an Apps task id"),
        ("apps:1:-1:add_event", {}, "is not an Apps task id"),
        ("apps:2:{seed}:{template}", {"difficulty": 1}, "difficulty 2, this env has difficulty 1"),
        ("apps:2:{seed}:nope", {}, "draws template '{template}', not 'nope'"),
        ("apps:2:{seed}:{template}", {"split": "test"}, "it belongs to the 'train' split"),
    ],
)
def test_task_option_rejects_what_the_env_cannot_pose(task_id, kwargs, message):
    task = next(t for s in range(100) if (t := generate(s, 2)) and t.split == "train")
    fill = {"seed": task.seed, "template": task.spec.template}
    with pytest.raises(ValueError, match=message.format(**fill).replace("(", r"\(")):
        make(**kwargs).reset(options={"task": task_id.format(**fill)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "dev"}, "Expect `split` to be 'train' or 'test', actually: 'dev'"),
        ({"difficulty": 4}, "Expect `difficulty` to be 1, 2, 3 or None, actually: 4"),
        ({"difficulty": True}, "Expect `difficulty` to be 1, 2, 3 or None, actually: True"),
        ({"max_turns": 0}, "Expect `max_turns` to be a positive int, actually: 0"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make(**kwargs)


def test_turn_limit_truncates_with_no_reward():
    env = make(max_turns=3)
    env.reset(seed=0)
    results = [env.step(format_tool_call("api_docs", {})) for _ in range(3)]
    assert [r[3] for r in results] == [False, False, True] and results[-1][1] == 0.0


def test_tools_and_prompts():
    env = make()
    obs, info = env.reset(seed=0)
    names = [t["function"]["name"] for t in info["tools"]]
    assert names == ["api_docs", "call_api", "complete_task"]
    call_api = info["tools"][1]["function"]["parameters"]
    assert call_api["required"] == ["app", "api"]
    assert call_api["properties"]["args"]["type"] == "object"
    assert "Today is Wednesday 2024-05-15." in info["messages"][0]["content"] and len(obs) < 250


# --- fuzz ---------------------------------------------------------------------------------------

API_NAMES = sorted({n for specs in apis.APIS.values() for n in specs})
PARAM_NAMES = sorted({p.name for s in apis.APIS.values() for a in s.values() for p in a.params})
HUGE = "x" * 1_000_000
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | st.text(max_size=30)
    | st.sampled_from([0, -1, 1, 10**9, 0.001, 10_000.01, "2024-05-15", "10:00", "a@b.co", "ünï",
                       "x" * 2001, "family"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)  # fmt: skip
untyped_calls = st.builds(
    lambda app, name, args: format_tool_call("call_api", {"app": app, "api": name, "args": args}),
    st.sampled_from([*APPS, "bank", "", "Contacts", HUGE]),
    st.sampled_from([*API_NAMES, "drop_all", "__init__", HUGE]),
    st.dictionaries(st.sampled_from([*PARAM_NAMES, "x", ""]), json_values, max_size=4),
)
other_actions = st.one_of(
    st.text(max_size=200),
    st.text(max_size=80).map(lambda t: f"<tool_call>{t}</tool_call>"),
    st.sampled_from([HUGE, f"<tool_call>{HUGE}", "<tool_call>{}</tool_call>", "\ud800\U0001f600",
                     '<tool_call>{"name": "call_api", "arguments": {"app": 1}}</tool_call>',
                     '<tool_call>{"name": "call_api", "arguments": "[1]"}</tool_call>',
                     '<tool_call>{"name": "payments.send", "arguments": {}}</tool_call>',
                     '<tool_call>{"name": "call_api", "arguments": {"app": "payments", "api": '
                     '"send", "args": {"to": "a@b.co", "amount": NaN}}}</tool_call>']),
    st.builds(lambda app: format_tool_call("api_docs", {"app": app}), json_values),
    st.builds(format_tool_call, st.text(max_size=10), st.dictionaries(st.text(max_size=5), json_values)),
)  # fmt: skip
HOSTILE_VALUES = {
    "int": [-1, 0, 10**9, 10**40, 1.5, "1", True, None],
    "amount": [-5, 0, 10**30, float("nan"), float("inf"), 5.555, "5", True, 10_000.01, 9999.99],
    "date": ["2024-02-30", "", "tomorrow", "2024-5-1", 20240515],
    "time": ["24:00", "9:00", "10:60", None],
    "email": ["x", "a@b", "a b@c.d", HUGE, "ünï@ü.de"],
    "str": ["", "   ", "x" * 101, HUGE, 5, ["a"]],
    "query": ["x" * 101, HUGE, [], {}],
    "text": ["x" * 2001, HUGE, None],
}


ID_COLLECTIONS = {"contact_id": "contacts", "event_id": "events", "email_id": "emails",
                  "note_id": "notes", "file_id": "files"}  # fmt: skip


def _valid_values(param: apis.Param, world: dict) -> list:
    """Values an API would accept for `param`, many naming real records."""
    kind = param.kind
    ids = [r["id"] for r in world[ID_COLLECTIONS.get(param.name, "contacts")]]
    names = [c["name"] for c in world["contacts"]] + [f["name"] for f in world["folders"]]
    values = {
        "int": ids or [1],
        "amount": [0.01, 5, 12.5, 99.99],
        "date": ["2024-05-15", "2024-05-20", "2024-04-20"],
        "time": ["10:00", "23:59"],
        "email": [c["email"] for c in world["contacts"]] or ["a@b.co"],
        "str": ["Hello", "Ünïcödé ☃", "Archive", *names],
        "query": ["", "a", *names],
        "text": ["body text", "x" * 2000],
    }
    return values.get(kind, kind.split("|"))


@st.composite
def typed_calls(draw, world: dict) -> str:
    """A call of a real API whose arguments are mostly well-typed, some valid, some hostile."""
    spec = draw(st.sampled_from([a for specs in apis.APIS.values() for a in specs.values()]))
    args = {}
    for param in spec.params:
        if draw(st.integers(0, 9)) < (9 if param.required else 5):
            hostile = HOSTILE_VALUES.get(param.kind, ["FAMILY", "", 1])
            pool = hostile if draw(st.integers(0, 3)) == 3 else _valid_values(param, world)
            args[param.name] = draw(st.sampled_from(pool))
    if draw(st.integers(0, 9)) == 9:
        args["extra"] = 1
    return format_tool_call("call_api", {"app": spec.app, "api": spec.name, "args": args})


def _may_write(action: str, messages: list[dict]) -> bool:
    """Whether a call in `action` is a write API call that succeeded."""
    calls = parse_action(action).tool_calls
    for call, message in zip(calls, messages, strict=False):
        app, name = str(call.arguments.get("app")), str(call.arguments.get("api"))
        writes = call.name == "call_api" and not apis.is_read_only(app, name)
        if writes and not message["content"].startswith("Error:"):
            return True
    return False


def _check_invariants(world: dict) -> None:
    assert math.isfinite(world["balance"]) and world["balance"] >= 0
    ids = [r["id"] for name in COLLECTIONS for r in world[name]]
    assert len(ids) == len(set(ids)) and world["next_id"] > max(ids)
    assert len(json.dumps(world, allow_nan=False)) < 200_000
    assert all(0 < p["amount"] <= 10_000 for p in world["payments"])


FUZZ_ENV = make(max_turns=50)
FUZZ_STATS = {"steps": 0, "writes": 0}


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data(), st.integers(0, 2**31 - 1))
def fuzz_ten_actions(data, seed):
    env = FUZZ_ENV
    env.reset(seed=seed)
    for _ in range(10):
        calls = typed_calls(env.world)
        twice = calls.map(lambda c: c + c)  # two calls in one turn
        action = data.draw(st.one_of(calls, calls, twice, untyped_calls, other_actions))
        before = copy.deepcopy(env.world)
        obs, reward, terminated, truncated, info = env.step(action)
        assert isinstance(obs, str) and reward in (0.0, 1.0)
        writes = _may_write(action, info["messages"])
        if not writes:
            assert env.world == before, action[:200]
        _check_invariants(env.world)
        FUZZ_STATS["steps"] += 1
        FUZZ_STATS["writes"] += writes
        if terminated or truncated:
            env.reset(seed=seed)


def test_fuzz_hostile_actions_never_raise_and_invalid_ones_change_nothing():
    FUZZ_STATS.update(steps=0, writes=0)
    fuzz_ten_actions()  # 100 examples x 10 actions
    # Not vacuous: some calls were valid writes, so hostile ones also met changed worlds.
    assert FUZZ_STATS["steps"] >= 1000 and FUZZ_STATS["writes"] > 20, FUZZ_STATS
