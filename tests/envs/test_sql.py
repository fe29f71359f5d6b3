"""`looprl/SQL-v0`: the read-only sandbox, the tools, the reward, tasks, split and fuzzing."""

from __future__ import annotations

import doctest
import itertools
import json
import sys
import threading
import time
from collections import Counter

import gymnasium
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import looprl.envs  # noqa: F401 — registers looprl/SQL-v0
from looprl.envs import format_tool_call, sql_data
from looprl.envs import sql as sql_module
from looprl.envs.sql import (
    QueryError,
    ReadOnlyDatabase,
    SqlEnv,
    format_result,
    is_degenerate,
    results_match,
    split_of,
)
from looprl.envs.sql_data import CATEGORIES, CITIES, COUNTRIES, GENRES, MAJORS, SCHEMAS, TERMS, Draw

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="SQL-v0 needs Python 3.11")

LYON = "sql:shop:0:customers_in_city:city=Lyon"  # train split; 1 column, 1 row
CHEAPEST = "sql:shop:0:cheapest_products:k=3"  # train split; asks for an order
PER_CITY = "sql:shop:0:customers_per_city_since:year=2020"  # train split; GROUP BY
QUANTITY = "sql:shop:0:quantity_stats_in_year:year=2024"  # train split; MIN, MAX, AVG
BREST = "sql:shop:0:customers_in_city:city=Brest"  # test split


def make(**kwargs) -> SqlEnv:
    return gymnasium.make("looprl/SQL-v0", **kwargs).unwrapped


def started(task_id: str = LYON, **kwargs) -> SqlEnv:
    env = make(**kwargs)
    env.reset(options={"task": task_id})
    return env


def call(env: SqlEnv, tool: str, **arguments) -> tuple[str, float, bool]:
    obs, reward, terminated, _, _ = env.step(format_tool_call(tool, arguments))
    return obs, reward, terminated


def shop_database(**kwargs) -> ReadOnlyDatabase:
    limits = {"max_vm_steps": 10_000_000, "timeout_s": 5.0, **kwargs}
    return ReadOnlyDatabase(SCHEMAS["shop"].tables, SCHEMAS["shop"].rows(0), **limits)


# --- the sandbox ----------------------------------------------------------------------

HOSTILE_SQL = [
    ("DROP TABLE customers", 'found "DROP"'),
    ("  /* c */ -- c\n DELETE FROM orders", 'found "DELETE"'),
    ("UPDATE products SET price = 0", 'found "UPDATE"'),
    ("INSERT INTO customers VALUES (99, 'x', 'y', 2020)", 'found "INSERT"'),
    ("CREATE TABLE t (x)", 'found "CREATE"'),
    ("ALTER TABLE orders RENAME TO o", 'found "ALTER"'),
    ("PRAGMA query_only = OFF", 'found "PRAGMA"'),
    ("PRAGMA writable_schema = 1", 'found "PRAGMA"'),
    ("ATTACH ':memory:' AS other", 'found "ATTACH"'),
    ("VACUUM INTO '/tmp/looprl_sql_escape.db'", 'found "VACUUM"'),
    ("BEGIN", 'found "BEGIN"'),
    ("REINDEX", 'found "REINDEX"'),
    ("SELECT 1; DROP TABLE customers", "only one statement per query"),
    ("WITH x AS (SELECT 1) DELETE FROM orders", "not authorized"),
    ("WITH x AS (SELECT 1) INSERT INTO customers SELECT * FROM customers", "not authorized"),
    ("SELECT * FROM pragma_table_info('orders')", "not authorized"),
    ("SELECT load_extension('/tmp/x.so')", "not authorized to use function: load_extension"),
    ("SELECT random()", "not authorized to use function: random"),
    ("SELECT RANDOMBLOB(8)", "not authorized to use function: RANDOMBLOB"),
    ("SELECT CURRENT_TIMESTAMP", "not authorized to use function: CURRENT_TIMESTAMP"),
    ("SELECT date('now')", "date() may not read the clock"),
    ("SELECT datetime()", "datetime() may not read the clock"),
    ("SELECT strftime('%Y', order_date, 'localtime') FROM orders", "strftime() may not read"),
    ("SELECT printf('%.*c', 100000000, 'x')", "printf() allows widths and precisions up to 100"),
    ("SELECT format(CAST('%999d' AS BLOB), 1)", "format() allows widths"),
    ("SELECT zeroblob(100000000)", "a value grew over 10,000 bytes"),
    (
        "WITH RECURSIVE r(s) AS (SELECT 'x' UNION ALL SELECT s || s FROM r) "
        "SELECT max(length(s)) FROM r",
        "a value grew over 10,000 bytes",
    ),
    ("SELECT COUNT(*) FROM orders a, orders b, orders c, orders d", "stopped after 10,000,000"),
    ("SELECT '\ud800'", "not valid UTF-8"),
    ("SELECT '\x00'", "null character"),
    ("", "found an empty query"),
    ("(SELECT 1)", 'found "(SELECT 1)"'),
    ("x" * 5000, "the query has 5,000 characters; at most 4,000 are allowed"),
    ("SELEC name FROM customers", 'found "SELEC"'),
    ("SELECT nme FROM customers", "no such column: nme"),
]


@pytest.mark.parametrize(("sql", "message"), HOSTILE_SQL)
def test_hostile_queries_get_an_error_and_change_nothing(sql, message):
    database = shop_database()
    before, dump = database.snapshot(), database.dump()
    with pytest.raises(QueryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        database.query(sql, 20)
    assert database.snapshot() == before and database.dump() == dump
    assert database.query("SELECT COUNT(*) FROM customers", 1)[1] == [(31,)]


def test_the_database_accepts_ordinary_read_queries():
    database = shop_database()
    columns, rows, more = database.query(
        "WITH c AS (SELECT city FROM customers) "
        "SELECT city, COUNT(*) AS n FROM c GROUP BY city ORDER BY n DESC, city LIMIT 2",
        20,
    )
    assert (columns, more) == (["city", "n"], False) and len(rows) == 2
    assert database.query("SELECT strftime('%Y', '2023-04-05'), date('2023-01-31', '+1 day')", 1)[
        1
    ] == [("2023", "2023-02-01")]
    assert database.query("SELECT printf('%5.2f', 3.14159)", 1)[1] == [(" 3.14",)]
    assert database.query("VALUES (1), (2), (3)", 2)[1:] == ([(1,), (2,)], True)


def test_the_step_budget_is_deterministic_and_counts_python_wrapped_calls():
    database = shop_database(max_vm_steps=200_000)
    cheap = "SELECT strftime('%Y', order_date) FROM orders"
    assert len(database.query(cheap, 1000)[1]) == 88
    wrapped = (  # 88 * 88 calls of strftime: 8M steps, though few VM instructions
        "SELECT COUNT(*) FROM orders a, orders b "
        "WHERE strftime('%Y', a.order_date, '+' || b.id || ' days') > ''"
    )
    for _ in range(3):
        with pytest.raises(QueryError, match="stopped after 200,000 SQLite steps"):
            database.query(wrapped, 1)


def test_the_wall_clock_stops_what_the_step_budget_allows():
    database = shop_database(max_vm_steps=10**12, timeout_s=0.05)
    started_at = time.monotonic()
    with pytest.raises(QueryError, match=r"stopped after 0.05 s"):
        database.query("SELECT COUNT(*) FROM orders a, orders b, orders c, orders d", 1)
    assert time.monotonic() - started_at < 30  # the query itself would run for hours


def test_an_unbounded_recursive_query_returns_its_first_rows():
    database = shop_database()
    sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"
    assert database.query(sql, 3)[1:] == ([(1,), (2,), (3,)], True)


def test_invalid_utf8_text_is_shown_with_replacement_characters():
    assert shop_database().query("SELECT CAST(x'ff41' AS TEXT)", 1)[1] == [("\ufffdA",)]


# --- tools ----------------------------------------------------------------------------


def test_list_tables_shows_every_table_with_its_rows():
    obs, reward, terminated = call(started(), "list_tables")
    assert obs == "customers (31 rows)\nproducts (29 rows)\norders (88 rows)"
    assert (reward, terminated) == (0.0, False)


def test_describe_table_shows_columns_references_and_first_rows():
    obs = call(started(), "describe_table", name=" Orders ")[0]
    assert obs.splitlines() == [
        "Table orders (88 rows), columns:",
        "  id INTEGER PRIMARY KEY",
        "  customer_id INTEGER REFERENCES customers(id)",
        "  product_id INTEGER REFERENCES products(id)",
        "  quantity INTEGER",
        "  order_date TEXT",
        "  status TEXT",
        "First 3 rows:",
        "id | customer_id | product_id | quantity | order_date | status",
        "1 | 22 | 20 | 3 | 2021-01-08 | delivered",
        *obs.splitlines()[10:],
    ]
    assert len(obs.splitlines()) == 12


def test_describe_table_names_the_tables_when_one_is_unknown():
    obs = call(started(), "describe_table", name="clients")[0]
    assert obs == 'Error: no table named "clients"; the tables are: customers, products, orders.'


def test_run_query_shows_a_compact_table_and_caps_rows():
    env = started(max_rows=2)
    obs = call(env, "run_query", sql="SELECT id, name FROM customers ORDER BY id")[0]
    assert obs.splitlines() == [
        "id | name",
        "1 | Pablo Dubois",
        "2 | Elena Rossi",
        "(first 2 rows shown; the query returned more)",
    ]
    obs = call(env, "run_query", sql="SELECT name FROM customers WHERE id < 0")[0]
    assert obs == "name\n(0 rows)"


def test_run_query_errors_are_messages_and_do_not_end_the_episode():
    obs, reward, terminated = call(started(), "run_query", sql="DROP TABLE orders")
    assert obs.startswith("Error: SQL error: expected a query starting with SELECT, WITH or VALUES")
    assert (reward, terminated) == (0.0, False)


def test_format_result_rounds_floats_and_shortens_long_cells():
    text = format_result(["a", "b", "c"], [(1 / 3, "x" * 100, b"\x01")], more=False)
    assert text == f"a | b | c\n0.333333 | {'x' * 57}... | x'01'\n(1 row)"


# --- submit and the reward --------------------------------------------------------------


@pytest.mark.parametrize(
    ("task_id", "sql"),
    [
        (LYON, "SELECT COUNT(*) FROM customers WHERE city = 'Lyon'"),
        (LYON, "select count(id) as n from customers where city like 'lyon'"),
        (PER_CITY, "SELECT COUNT(*), city FROM customers WHERE signup_year > 2019 GROUP BY 2"),
        (CHEAPEST, "SELECT price, name FROM products ORDER BY price ASC, name LIMIT 3"),
        (
            QUANTITY,
            "SELECT AVG(quantity) * 1.0, MAX(quantity), MIN(quantity) FROM orders "
            "WHERE order_date BETWEEN '2024-01-01' AND '2024-12-31'",
        ),
    ],
)
def test_submit_rewards_any_query_with_the_expected_rows(task_id, sql):
    obs, reward, terminated = call(started(task_id), "submit", sql=sql)
    assert (obs, reward, terminated) == ("Correct.", 1.0, True)


@pytest.mark.parametrize(
    ("task_id", "sql"),
    [
        (LYON, "SELECT COUNT(*) FROM customers"),
        (LYON, "SELECT COUNT(*), 'Lyon' FROM customers WHERE city = 'Lyon'"),
        (PER_CITY, "SELECT city, COUNT(*) FROM customers GROUP BY city HAVING COUNT(*) > 99"),
        (CHEAPEST, "SELECT name, price FROM products ORDER BY price DESC LIMIT 3"),
        (CHEAPEST, "SELECT name, price FROM products ORDER BY price"),
        (
            QUANTITY,
            "SELECT MIN(quantity), MAX(quantity), ROUND(AVG(quantity), 1) FROM orders "
            "WHERE order_date LIKE '2024%'",
        ),
        (LYON, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"),
    ],
)
def test_submit_gives_zero_for_other_rows_and_ends_the_episode(task_id, sql):
    obs, reward, terminated = call(started(task_id), "submit", sql=sql)
    assert (obs, reward, terminated) == (
        "Incorrect: the rows differ from the expected ones.",
        0.0,
        True,
    )


def test_a_query_that_fails_is_not_submitted():
    env = started()
    obs, reward, terminated = call(env, "submit", sql="SELECT COUNT(*) FROM clients")
    assert obs == (
        "Error: SQL error: no such table: clients. Nothing was submitted; fix the query and "
        "submit again."
    )
    assert (reward, terminated) == (0.0, False)
    assert call(env, "submit", sql=env.task.gold_sql)[1] == 1.0


def test_calls_after_submit_in_the_same_turn_are_not_run():
    env = started()
    action = format_tool_call("submit", {"sql": env.task.gold_sql}) + format_tool_call(
        "list_tables", {}
    )
    obs, reward, terminated, _, info = env.step(action)
    assert obs == "Correct.\nError: not run: the episode ended at an earlier call this turn."
    assert (reward, terminated, info["success"]) == (1.0, True, True)


@pytest.mark.parametrize(
    ("got", "expected", "ordered", "match"),
    [
        ([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], False, True),
        ([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], True, False),
        ([("a", 1), ("b", 2)], [(1, "a"), (2, "b")], True, True),
        ([(3,)], [(3.0,)], False, True),
        ([(0.1 + 0.2,)], [(0.3,)], False, True),
        ([(2.3333334,)], [(2.3333333,)], False, True),
        ([(2.333334,)], [(2.333333,)], False, False),
        ([(1,), (1,)], [(1,)], False, False),
        ([(1,), (1,), (2,)], [(1,), (2,), (2,)], False, False),
        ([(None,)], [(None,)], False, True),
        ([("1",)], [(1,)], False, False),
        ([(1, 2)], [(1,)], False, False),
        ([], [], False, True),
    ],
)
def test_results_match(got, expected, ordered, match):
    assert results_match(got, expected, ordered) is match


def test_degenerate_answers_are_never_asked():
    assert is_degenerate([]) and is_degenerate([(0,)]) and is_degenerate([(None, 0.0)])
    assert not is_degenerate([(1,)]) and not is_degenerate([(0,), (0,)])
    env = make()
    for seed in range(300):
        env.reset(seed=seed)
        assert not is_degenerate(env.task.expected)


def test_trivial_queries_solve_almost_nothing():
    trivial = ["SELECT 0", "SELECT 1", "SELECT NULL", "SELECT 2", "SELECT 'x'"]
    env, solved = make(), 0
    for seed in range(200):
        env.reset(seed=seed)
        solved += call(env, "submit", sql=trivial[seed % len(trivial)])[1]
    assert solved / 200 < 0.1


def test_doctests_pass():
    for module in (sql_module, sql_data):
        assert doctest.testmod(module).failed == 0


# --- oracle -----------------------------------------------------------------------------


def play_oracle(env: SqlEnv, seed: int) -> tuple[float, list[str]]:
    env.reset(seed=seed)
    actions, total, done = [], 0.0, False
    while not done:
        actions.append(env.oracle_action())
        _, reward, terminated, truncated, _ = env.step(actions[-1])
        total, done = total + reward, terminated or truncated
    return total, actions


@pytest.mark.parametrize("split", ["train", "test"])
def test_oracle_solves_500_tasks_of_each_split(split):
    env = make(split=split)
    assert all(play_oracle(env, seed)[0] == 1.0 for seed in range(500))


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_oracle_solves_every_difficulty(difficulty):
    env = make(difficulty=difficulty, split="test")
    assert all(play_oracle(env, seed)[0] == 1.0 for seed in range(100))


def test_oracle_lists_then_describes_the_tables_it_joins_then_submits():
    env = make()
    env.reset(options={"task": "sql:shop:0:orders_per_city_in_year:year=2023"})
    first = env.oracle_action()
    assert first == '<tool_call>{"name": "list_tables", "arguments": {}}</tool_call>'
    env.step(first)
    assert env.oracle_action() == "\n".join(
        format_tool_call("describe_table", {"name": name}) for name in ("customers", "orders")
    )
    env.step(env.oracle_action())
    assert env.oracle_action() == format_tool_call("submit", {"sql": env.task.gold_sql})


def test_oracle_submits_on_the_last_turn():
    env = started(max_turns=1)
    assert (
        json.loads(env.oracle_action()[len("<tool_call>") : -len("</tool_call>")])["name"]
        == "submit"
    )


# --- tasks, split, settings ---------------------------------------------------------------


def test_the_prompt_is_the_question_and_the_task_id_restores_it():
    env = make()
    obs, info = env.reset(options={"task": LYON})
    assert obs == "Database: shop (SQLite).\nQuestion: How many customers live in Lyon?"
    assert info["task_id"] == LYON and env.task.expected == ((11,),)
    assert len(info["messages"][0]["content"]) < 250


def test_task_ids_of_sampled_tasks_restore_the_same_task():
    env, other = make(), make()
    for seed in range(30):
        env.reset(seed=seed)
        other.reset(options={"task": env.task.task_id})
        assert other.task == env.task


def test_templates_are_well_formed():
    for schema in SCHEMAS.values():
        names = [template.name for template in schema.templates]
        assert len(set(names)) == len(names)
        assert sorted({t.difficulty for t in schema.templates}) == [1, 2, 3]
        for template in schema.templates:
            assert all(
                not set(str(value)) & set(",=:")  # they would break task ids
                for options in template.params.values()
                for value in options
            )
            question, sql = template.render({k: v[0] for k, v in template.params.items()})
            assert "{" not in question + sql and schema.tables_in(sql)


def test_data_is_stable_across_runs_and_differs_across_seeds():
    rows = SCHEMAS["shop"].rows(0)
    assert rows["customers"][0] == (1, "Pablo Dubois", "Paris", 2019)
    assert rows["products"][0] == (1, "Swift Bowl", "pets", 123.34)
    assert rows["orders"][0] == (1, 22, 20, 3, "2021-01-08", "delivered")
    assert SCHEMAS["shop"].rows(1) != rows and SCHEMAS["shop"].rows(0) == rows
    draw = Draw("x")
    assert (draw.integer(1, 6), draw.choice("abc"), draw.sample(range(10), 3)) == (
        4,
        "b",
        [4, 7, 5],
    )


@pytest.mark.parametrize(
    ("schema", "table", "column", "pool"),
    [
        ("shop", "customers", 2, CITIES),
        ("shop", "products", 2, CATEGORIES),
        ("school", "students", 2, MAJORS),
        ("school", "enrollments", 3, TERMS),
        ("library", "authors", 2, COUNTRIES),
        ("library", "books", 3, GENRES),
        ("library", "members", 2, CITIES),
    ],
)
def test_each_database_draws_a_few_values_of_a_wider_pool(schema, table, column, pool):
    """Questions name values of the whole pool, so none can be answered from memory of a few."""
    held = [{row[column] for row in SCHEMAS[schema].rows(seed)[table]} for seed in range(40)]
    assert all(values <= set(pool) and 2 <= len(values) <= 6 for values in held)
    assert len(set().union(*held)) == len(pool) >= 12
    slots = {"shop": ("city", "category"), "school": ("major", "department", "term"),
             "library": ("country", "genre", "city")}[schema]  # fmt: skip
    for template in SCHEMAS[schema].templates:
        for name, options in template.params.items():
            if name in slots:
                assert len(options) >= 12, (template.name, name)


def test_questions_name_values_their_database_holds_and_no_template_crowds_out_others():
    env = make(split="test", difficulty=1)
    drawn = Counter()
    for seed in range(400):
        env.reset(seed=seed)
        task = env.task
        drawn[task.template] += 1
        rows = SCHEMAS[task.schema].rows(task.data_seed)
        held = {v for table in rows.values() for row in table for v in row}
        assert all(value in held for _, value in task.params if isinstance(value, str)), task.task_id
    templates = [t for schema in SCHEMAS.values() for t in schema.templates if t.difficulty == 1]
    assert len(drawn) == len(templates)
    assert max(drawn.values()) < 3 * 400 / len(templates)  # names drawn from a whole pool: 6x


def test_train_and_test_questions_are_disjoint():
    def questions(split):
        env = make(split=split)
        keys = set()
        for seed in range(400):
            env.reset(seed=seed)
            task = env.task
            keys.add((task.schema, task.template, task.params))
        return keys

    train, test = questions("train"), questions("test")
    assert len(train) > 150 and len(test) > 60 and not train & test
    assert split_of("shop:customers_in_city:city=Nice") == "test"


def test_tasks_follow_difficulty_and_schemas():
    env = make(difficulty=[1, 3], schemas=["library"])
    seen = set()
    for seed in range(60):
        env.reset(seed=seed)
        template = SCHEMAS["library"].template(env.task.template)
        seen.add(template.difficulty)
        assert env.task.schema == "library"
    assert seen == {1, 3}


@pytest.mark.parametrize(
    ("task_id", "message"),
    [
        ("shop:0:customers_in_city:city=Lyon", "is not a SQL task id; expected 'sql:<schema>"),
        ("sql:zoo:0:customers_in_city:city=Lyon", r"schema 'zoo' is not one of \['shop'"),
        ("sql:shop:007:customers_in_city:city=Lyon", r"data seed must be an int in \[0, 1000000\)"),
        ("sql:shop:1000000:customers_in_city:city=Lyon", "data seed must be an int"),
        ("sql:shop:0:customers_in_town:city=Lyon", "no template 'customers_in_town' in shop"),
        ("sql:shop:0:customers_in_city:town=Lyon", "expected parameters 'city=<value>'"),
        ("sql:shop:0:customers_in_city:", "expected parameters 'city=<value>', got ''"),
        ("sql:shop:0:customers_in_city:city=Rome", "city='Rome' is not one of: Amiens"),
        (BREST, "its question belongs to the 'test' split, not 'train'"),
        ("sql:shop:0:cheapest_products:k=3", "its difficulty is 2, not one of \\[1\\]"),
        ("sql:shop:2:customers_in_city:city=Nice", "belongs to the 'test' split"),
    ],
)
def test_task_ids_the_env_cannot_pose_are_rejected(task_id, message):
    with pytest.raises(ValueError, match=message):
        make(difficulty=1).reset(options={"task": task_id})


def test_a_degenerate_task_id_is_rejected():
    env = make()
    for seed in range(200):  # find a database where no customer of Lyon signed up since 2023
        task_id = f"sql:shop:{seed}:customers_signed_up_since:city=Lyon,year=2023"
        try:
            env.reset(options={"task": task_id})
        except ValueError as e:
            assert "the answer is empty or all zeros" in str(e)
            return
    pytest.fail("expected at least one degenerate task in 200 databases")


def test_difficulty_1_has_too_many_questions_to_memorise():
    """Wide thresholds: a small model must copy the question's values, not recall each query."""
    questions = [(schema, t, values) for schema in SCHEMAS.values() for t in schema.templates if t.difficulty == 1
                 for values in itertools.product(*t.params.values())]
    assert len(questions) > 1000


def test_the_test_split_poses_its_own_tasks():
    obs, info = make(split="test").reset(options={"task": BREST})
    assert info["task_id"] == BREST and "Brest" in obs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "dev"}, "Expect `split` to be 'train' or 'test', actually: 'dev'"),
        ({"difficulty": 4}, "Expect `difficulty` to be 1, 2, 3 or a non-empty list"),
        ({"difficulty": []}, "Expect `difficulty`"),
        ({"difficulty": [1, 2.0]}, "Expect `difficulty`"),
        ({"difficulty": True}, "Expect `difficulty`"),
        ({"schemas": "shop"}, "Expect `schemas` to be a non-empty list of names"),
        ({"schemas": ["shop", "zoo"]}, "Expect `schemas`"),
        ({"max_rows": 0}, r"Expect `max_rows` to be an int in \[1, 1000\], actually: 0"),
        ({"timeout_s": 0}, r"Expect `timeout_s` to be a number in \(0, 60\]"),
        ({"max_vm_steps": 10}, "Expect `max_vm_steps` to be an int >= 1000, actually: 10"),
        ({"max_turns": 0}, "Expect `max_turns` to be a positive int"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_the_env_can_be_stepped_from_another_thread():
    env = started()
    results = []
    worker = threading.Thread(target=lambda: results.append(call(env, "list_tables")[0]))
    worker.start()
    worker.join()
    assert results[0].startswith("customers (31 rows)")


# --- fuzzing ------------------------------------------------------------------------------

MEGABYTE = "\u00e9" * 1_000_000
JUNK_ACTIONS = [
    "",
    "<tool_call>",
    "</tool_call>",
    "<tool_call>{not json}</tool_call>",
    "<tool_call>[1, 2]</tool_call>",
    '<tool_call>{"name": 5}</tool_call>',
    '<tool_call>{"name": "run_query", "arguments": "oops"}</tool_call>',
    '<tool_call>{"name": "run_query", "arguments": {"sql": 5}}</tool_call>',
    '<tool_call>{"name": "run_query", "arguments": {"query": "SELECT 1"}}</tool_call>',
    '<tool_call>{"name": "submit", "arguments": {"sql": null}}</tool_call>',
    '<tool_call>{"name": "describe_table", "arguments": {"name": ["orders"]}}</tool_call>',
    '<tool_call>{"name": "list_tables", "arguments": {"x": 1}}</tool_call>',
    '<tool_call>{"name": "drop_table", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "run_query", "arguments": {"sql": "' + "[" * 5000 + '"}}</tool_call>',
    "<tool_call>" + "[" * 100_000 + "</tool_call>",
    format_tool_call("run_query", {"sql": "SELECT '" + MEGABYTE + "'"}),
    format_tool_call("describe_table", {"name": MEGABYTE}),
    MEGABYTE,
    "\ud800\udfff<tool_call>\x00</tool_call>",
    format_tool_call("describe_table", {"name": "orders; DROP TABLE orders"}),
    format_tool_call("describe_table", {"name": "sqlite_master"}),
] + [format_tool_call("run_query", {"sql": sql}) for sql, _ in HOSTILE_SQL]

sql_text = st.one_of(
    st.sampled_from([sql for sql, _ in HOSTILE_SQL] + ["SELECT 1", "SELECT * FROM orders"]),
    st.text(max_size=200),
    st.builds(
        lambda head, tail: head + tail,
        st.sampled_from(["SELECT ", "WITH ", "VALUES ", "select * from orders ", "/**/SELECT "]),
        st.text(
            alphabet=st.sampled_from("()*,;'\"-+/%|=<> 0123456789abcdeforsty\n\\"), max_size=80
        ),
    ),
)
json_values = st.one_of(
    st.none(), st.integers(), st.text(max_size=20), st.lists(st.integers(), max_size=3)
)
sql_calls = st.builds(
    format_tool_call,
    st.sampled_from(["run_query", "submit"]),
    st.fixed_dictionaries({"sql": sql_text}),
)
actions = st.one_of(  # sql_calls three times: most actions should reach the database
    sql_calls,
    sql_calls,
    sql_calls,
    st.sampled_from(JUNK_ACTIONS),
    st.text(max_size=300),
    st.builds(
        format_tool_call,
        st.just("describe_table"),
        st.fixed_dictionaries({"name": st.text(max_size=30)}),
    ),
    st.builds(
        format_tool_call,
        st.sampled_from(["run_query", "submit", "describe_table", "list_tables", "nope"]),
        st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    ),
)

FUZZ_RUNS, FUZZ_ACTIONS_PER_RUN = 10, 100  # 1,000 actions in all


@pytest.fixture(scope="module")
def fuzz_env():
    """One env for every fuzz run, so that any change would pile up across runs."""
    env = make()
    env.reset(options={"task": PER_CITY})
    return env, env.database.snapshot(), env.database.dump()


@settings(
    max_examples=FUZZ_RUNS,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(actions, min_size=FUZZ_ACTIONS_PER_RUN, max_size=FUZZ_ACTIONS_PER_RUN))
def test_fuzzed_actions_never_raise_and_never_change_the_database(fuzz_env, batch):
    env, snapshot, dump = fuzz_env
    env.reset(options={"task": PER_CITY})
    for action in batch:
        obs, reward, terminated, truncated, info = env.step(action)
        assert isinstance(obs, str) and reward in (0.0, 1.0)
        assert env.database.snapshot() == snapshot
        assert env.task.task_id == PER_CITY
        if terminated:  # only a submit whose query ran ends the episode
            assert any(
                m["name"] == "submit" and not m["content"].startswith("Error")
                for m in info["messages"]
            )
        if terminated or truncated:
            env.reset(options={"task": PER_CITY})
    assert env.database.dump() == dump
    fresh = shop_database()  # the same rows, built from scratch: nothing drifted
    assert env.database.dump() == fresh.dump() and env.database.snapshot() == fresh.snapshot()
