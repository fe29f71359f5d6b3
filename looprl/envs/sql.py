"""`looprl/SQL-v0`: answer a question about a generated SQLite database with one query.

Each task is a question over one of three schemas (`sql_data.SCHEMAS`), asked about an
in-memory database whose rows come from a data seed. The agent explores it with
`list_tables`, `describe_table` and `run_query`, then `submit`s a query; the reward is
1.0 when its result equals the gold query's (see `results_match`).

Model-written SQL runs in `ReadOnlyDatabase`, which nothing can change: see its
docstring for the layers. The train/test split is by question, not by database: a
question `(schema, template, params)` is held out iff the sha256 of its key is 0 mod 5,
so no held-out question is trained on, over any data seed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import re
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from looprl.envs.base import Task, ToolEnv
from looprl.envs.parsing import format_tool_call
from looprl.envs.sql_data import SCHEMAS, Row, Schema, Table, Template
from looprl.envs.tools import Tool, _quote

SPLITS = ("train", "test")
DIFFICULTIES = (1, 2, 3)
NUM_DATA_SEEDS = 1_000_000
MAX_DRAWS = 10_000
MAX_SQL_CHARS = 4_000
# Small enough that no single function call (instr, replace...) on values this size
# takes long: the VM-step budget cannot stop work done inside one instruction.
MAX_VALUE_BYTES = 10_000
MAX_SUBMIT_ROWS = 10_000
MAX_CELL_CHARS = 60
MAX_RESULT_CHARS = 4_000
MAX_ERROR_CHARS = 300
MAX_PERMUTED_COLUMNS = 6
SAMPLE_ROWS = 3
PROGRESS_INTERVAL = 1_000  # SQLite VM instructions between two progress-handler calls
PYTHON_CALL_STEPS = 1_000  # what a call to a Python-wrapped function counts (it takes ~5 us)
STATEMENTS = ("select", "with", "values")
# Functions whose results change between runs: allowing them would break replay.
DENIED_FUNCTIONS = frozenset(
    {"random", "randomblob", "current_date", "current_time", "current_timestamp", "load_extension"}
)
# SQLite's date functions read the clock for 'now' (and the time zone for 'localtime'
# and 'utc'), and printf pads to any width inside one VM instruction (~0.4 s for
# '%.*c' with 1e8): these are replaced by wrappers that refuse such arguments and
# otherwise call the built-in function on a second, plain connection.
CLOCK_FUNCTIONS = ("date", "time", "datetime", "julianday", "strftime", "unixepoch")
CLOCK_WORDS = frozenset({"now", "localtime", "utc"})
FORMAT_FUNCTIONS = ("printf", "format")
MAX_FORMAT_WIDTH = 100
_FORMAT_SPEC = re.compile(r"%[-+ #0,!]*(\*|\d+)?(?:\.(\*|\d+))?")
_ALLOWED_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE})
_LEADING_SPACE_AND_COMMENTS = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?(?:\*/|$))*", re.S)


class QueryError(Exception):
    """A query that did not run; the message is for the agent."""


class ReadOnlyDatabase:
    """An in-memory SQLite database that runs model-written queries and cannot change.

    Three layers each stop a write: only statements starting with SELECT, WITH or
    VALUES run; an authorizer allows only reads, SELECT and deterministic functions
    (no PRAGMA, ATTACH, VACUUM, DDL, DML or transactions); and `PRAGMA query_only`.
    A query may run `max_vm_steps` SQLite virtual-machine instructions (a call to a
    Python-wrapped function counts 1,000), a limit that is deterministic, and
    `timeout_s` seconds of wall clock, a safety net for work done inside one
    instruction (a sort). No value may exceed 10 kB, so no query can build a huge
    string or spend long in one function call; no database can be attached; and
    functions that read the clock or draw random numbers are refused, so the same
    query always gives the same answer.

    Args:
        tables: The tables to create.
        rows: Each table's rows.
        max_vm_steps: SQLite VM instructions one query may run.
        timeout_s: Seconds one query may run.

    Raises:
        RuntimeError: Python is older than 3.11, whose sqlite3 lacks `setlimit`.
    """

    def __init__(
        self,
        tables: Sequence[Table],
        rows: dict[str, list[Row]],
        *,
        max_vm_steps: int,
        timeout_s: float,
    ) -> None:
        if sys.version_info < (3, 11):
            raise RuntimeError(
                "looprl/SQL-v0 needs Python >= 3.11: its sandbox caps value sizes with "
                "sqlite3.Connection.setlimit"
            )
        self.max_vm_steps = max_vm_steps
        self.timeout_s = timeout_s
        self._steps = 0
        self._deadline: float | None = None
        self._function_error: str | None = None
        # Not tied to one thread: an env may be built in one thread and stepped in another.
        self._connection = sqlite3.connect(
            ":memory:", isolation_level=None, check_same_thread=False
        )
        self._builtins = sqlite3.connect(":memory:", check_same_thread=False)
        self._connection.text_factory = lambda raw: raw.decode("utf-8", "replace")
        for table in tables:
            self._connection.execute(table.create_statement())
            marks = ", ".join("?" * len(table.columns))
            self._connection.executemany(
                f"INSERT INTO {table.name} VALUES ({marks})", rows[table.name]
            )
        self._lock()

    def _lock(self) -> None:
        connection = self._connection
        connection.execute("PRAGMA query_only = ON")
        connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        connection.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 4 * MAX_SQL_CHARS)
        connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        for name in CLOCK_FUNCTIONS:
            connection.create_function(
                name, -1, self._guarded(name, _clock_problem), deterministic=True
            )
        for name in FORMAT_FUNCTIONS:
            connection.create_function(
                name, -1, self._guarded(name, _format_problem), deterministic=True
            )
        connection.set_authorizer(_authorize)
        connection.set_progress_handler(self._progress, PROGRESS_INTERVAL)

    # --- queries -------------------------------------------------------------------

    def query(
        self, sql: str, max_rows: int, *, timed: bool = True
    ) -> tuple[list[str], list[Row], bool]:
        """Runs one read-only statement.

        Args:
            sql: The statement.
            max_rows: The most rows returned.
            timed: Apply `timeout_s` (off for trusted gold queries, whose result must
                not depend on how busy the machine is).

        Returns:
            `(column names, up to max_rows rows, whether more rows exist)`.

        Raises:
            QueryError: The query is not allowed or failed; the message says why.
        """
        _check_statement(sql)
        self._steps = 0
        self._deadline = time.monotonic() + self.timeout_s if timed else None
        self._function_error = None
        cursor = self._connection.cursor()
        try:
            cursor.execute(sql)
            if cursor.description is None:
                raise QueryError("the statement returns no rows; write one SELECT query")
            columns = [d[0] for d in cursor.description]
            rows = cursor.fetchmany(max_rows + 1)
        except sqlite3.Error as e:
            raise QueryError(self._explain(e)) from None
        except UnicodeEncodeError:
            raise QueryError("the query holds characters that are not valid UTF-8") from None
        finally:
            cursor.close()  # also ends a statement left unfinished by fetchmany
        return columns, rows[:max_rows], len(rows) > max_rows

    def snapshot(self) -> bytes:
        """The database file's exact bytes (`sqlite3_serialize`), to check it never changes."""
        with self._unguarded():  # serialize reads the sqlite_dbpage table, which is denied
            return self._connection.serialize()

    def dump(self) -> str:
        """The SQL text that recreates the database (`iterdump`, which runs PRAGMAs)."""
        with self._unguarded():
            return "\n".join(self._connection.iterdump())

    @contextlib.contextmanager
    def _unguarded(self) -> Iterator[None]:
        """Lifts the authorizer and the step limit for trusted code (never for model SQL)."""
        self._connection.set_authorizer(None)
        self._connection.set_progress_handler(None, PROGRESS_INTERVAL)
        try:
            yield
        finally:
            self._connection.set_authorizer(_authorize)
            self._connection.set_progress_handler(self._progress, PROGRESS_INTERVAL)

    def close(self) -> None:
        self._connection.close()
        self._builtins.close()

    # --- the sandbox's hooks -------------------------------------------------------

    def _progress(self) -> bool:
        """Called every PROGRESS_INTERVAL VM instructions; True stops the query."""
        self._steps += PROGRESS_INTERVAL
        return self._steps > self.max_vm_steps or (
            self._deadline is not None and time.monotonic() > self._deadline
        )

    def _guarded(self, name: str, problem: Callable[[str, tuple[Any, ...]], str | None]) -> Any:
        """The built-in function `name`, refusing the arguments `problem` objects to."""

        def guarded(*args: Any) -> Any:
            self._steps += PYTHON_CALL_STEPS
            self._function_error = (
                self._budget_error() if self._steps > self.max_vm_steps else problem(name, args)
            )
            if self._function_error is not None:
                raise ValueError(self._function_error)
            marks = ", ".join("?" * len(args))
            return self._builtins.execute(f"SELECT {name}({marks})", args).fetchone()[0]

        return guarded

    def _budget_error(self) -> str:
        return (
            f"the query was stopped after {self.max_vm_steps:,} SQLite steps; make it "
            "cheaper (filter before joining, avoid cross joins)"
        )

    def _explain(self, error: sqlite3.Error) -> str:
        message = str(error)
        if self._function_error is not None:
            return self._function_error
        if message == "interrupted":
            if self._steps > self.max_vm_steps:
                return self._budget_error()
            return f"the query was stopped after {self.timeout_s:g} s; make it cheaper"
        if "not authorized" in message or "authorization denied" in message:
            return (
                f"{message}: the database is read-only; only SELECT queries with "
                "deterministic functions are allowed"
            )
        if message.startswith("You can only execute one statement"):
            return "only one statement per query is allowed; remove the ';' and what follows"
        if message == "string or blob too big":
            return f"a value grew over {MAX_VALUE_BYTES:,} bytes"
        return message


def _clock_problem(name: str, args: tuple[Any, ...]) -> str | None:
    if not args or any(isinstance(a, str) and a.strip().lower() in CLOCK_WORDS for a in args):
        return (
            f"{name}() may not read the clock or the time zone ('now', 'localtime', 'utc', or no "
            "arguments): give it a date from the data"
        )
    return None


def _format_problem(name: str, args: tuple[Any, ...]) -> str | None:
    spec = args[0] if args else ""
    text = spec.decode("utf-8", "replace") if isinstance(spec, bytes) else str(spec)
    for match in _FORMAT_SPEC.finditer(text):
        for size in match.groups():
            if size is not None and (size == "*" or int(size) > MAX_FORMAT_WIDTH):
                return (
                    f"{name}() allows widths and precisions up to {MAX_FORMAT_WIDTH}, not * or more"
                )
    return None


def _authorize(action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
    """Allows reads, SELECT, recursive CTEs and deterministic functions; denies the rest."""
    if action in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() not in DENIED_FUNCTIONS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _check_statement(sql: str) -> None:
    """Raises QueryError unless `sql` is short and starts with SELECT, WITH or VALUES."""
    if len(sql) > MAX_SQL_CHARS:
        raise QueryError(
            f"the query has {len(sql):,} characters; at most {MAX_SQL_CHARS:,} are allowed"
        )
    start = _LEADING_SPACE_AND_COMMENTS.match(sql).end()  # type: ignore[union-attr]
    word = re.match(r"[A-Za-z]*", sql[start:]).group(0)  # type: ignore[union-attr]
    if word.lower() not in STATEMENTS:
        rest = sql[start:]
        found = "an empty query" if not rest else _quote(word or rest, limit=20)
        raise QueryError(
            f"expected a query starting with SELECT, WITH or VALUES, found {found}; "
            "the database is read-only"
        )


# --- results ----------------------------------------------------------------------------


def results_match(got: Sequence[Row], expected: Sequence[Row], ordered: bool) -> bool:
    """Whether a query's rows answer the question: the reward function of SQL-v0.

    Rows are compared as multisets, or as lists when the question asks for an order.
    Numbers are compared rounded to 6 decimals (ints and floats alike); column names
    never matter, and neither does column order: some ordering of `got`'s columns
    must match (tried for up to 6 columns).

    Example:
        >>> results_match([("Lyon", 3), ("Nice", 1.0)], [(1, "Nice"), (3, "Lyon")], False)
        True
        >>> results_match([(1,), (2,)], [(2,), (1,)], ordered=True)
        False
    """
    if len(got) != len(expected):
        return False
    width = len(expected[0]) if expected else 0
    if any(len(row) != width for row in itertools.chain(got, expected)):
        return False
    target = [_normalize_row(row) for row in expected]
    target_counts = Counter(target)
    orders = (
        itertools.permutations(range(width)) if width <= MAX_PERMUTED_COLUMNS else [range(width)]
    )
    for order in orders:
        candidate = [_normalize_row(tuple(row[i] for i in order)) for row in got]
        if (candidate == target) if ordered else (Counter(candidate) == target_counts):
            return True
    return False


def _normalize_row(row: Row) -> Row:
    return tuple(round(float(v), 6) if isinstance(v, (int, float)) else v for v in row)


def is_degenerate(rows: Sequence[Row]) -> bool:
    """No rows, or one row of only NULLs and zeros: a trivial query could match it."""
    return not rows or (len(rows) == 1 and all(v is None or v == 0 for v in rows[0]))


def format_result(columns: Sequence[str], rows: Sequence[Row], more: bool) -> str:
    """A compact table: a header, one line per row, then the row count.

    Example:
        >>> print(format_result(["city", "n"], [("Lyon", 3), ("Nice", None)], more=False))
        city | n
        Lyon | 3
        Nice | NULL
        (2 rows)
    """
    lines = [" | ".join(_cell(c) for c in columns)]
    lines += [" | ".join(_cell(v) for v in row) for row in rows]
    if more:
        lines.append(f"(first {len(rows)} rows shown; the query returned more)")
    else:
        lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    text = "\n".join(lines)
    marker = "\n[output truncated]"
    return (
        text if len(text) <= MAX_RESULT_CHARS else text[: MAX_RESULT_CHARS - len(marker)] + marker
    )


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        text = repr(round(value, 6))
    elif isinstance(value, bytes):
        text = f"x'{value.hex()}'"
    else:
        text = str(value).replace("\n", "\\n")
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 3] + "..."


def split_of(question_key: str) -> str:
    """`"test"` for the held-out fifth of questions (by sha256), else `"train"`."""
    held_out = int(hashlib.sha256(question_key.encode()).hexdigest(), 16) % 5 == 0
    return "test" if held_out else "train"


# --- the environment ---------------------------------------------------------------------


@dataclass(frozen=True)
class SqlTask(Task):
    """A SQL-v0 task: a question about one generated database.

    Attributes:
        schema: The schema's name (`"shop"`, `"school"`, `"library"`).
        data_seed: Picks the database's rows.
        template: The question template's name.
        params: The template's parameter values, in order.
        gold_sql: The query that answers the question.
        expected: The gold query's rows on this database.
        ordered: Whether the question asks for an order.
        tables: The tables the gold query reads, in order of appearance.
    """

    schema: str = ""
    data_seed: int = 0
    template: str = ""
    params: tuple[tuple[str, str | int], ...] = ()
    gold_sql: str = ""
    expected: tuple[Row, ...] = ()
    ordered: bool = False
    tables: tuple[str, ...] = ()


class SqlEnv(ToolEnv):
    """Answer a question about a SQLite database by submitting one SELECT query.

    Task ids read `sql:<schema>:<data seed>:<template>:<name=value,...>`, e.g.
    `sql:shop:4821:customers_in_city:city=Lyon`.

    Args:
        split: `"train"` or `"test"` (the held-out fifth of questions).
        difficulty: 1 (one table: filters, counts), 2 (GROUP BY, HAVING, ORDER BY ...
            LIMIT on one table), 3 (joins of 2-3 tables), or a list of them.
        schemas: The schemas to ask about (`"shop"`, `"school"`, `"library"`).
        max_turns: Turns before the episode is truncated.
        max_rows: Rows `run_query` shows.
        timeout_s: Seconds one query may run (a safety net; see `max_vm_steps`).
        max_vm_steps: SQLite VM instructions one query may run: the deterministic limit.

    Raises:
        ValueError: Any argument out of range, naming it and what was expected.
    """

    description: ClassVar[str] = (
        "Text-to-SQL: explore a generated SQLite database, then submit one query that "
        "answers a question about it."
    )
    reward_description: ClassVar[str] = (
        "1.0 if the submitted query's rows equal the gold query's (as a multiset, or a list "
        "when the question asks for an order; numbers to 6 decimals; column names and order "
        "ignored), else 0.0; a submitted query that runs ends the episode."
    )
    system_prompt: ClassVar[str] = (
        "Answer the question with one SQLite query. Explore the database with the tools, "
        "then submit the query. Its rows are compared with the correct ones; column names "
        "do not matter. Do not round numbers."
    )

    def __init__(
        self,
        split: str = "train",
        difficulty: int | Sequence[int] = DIFFICULTIES,
        schemas: Sequence[str] = tuple(SCHEMAS),
        max_turns: int = 6,
        max_rows: int = 20,
        timeout_s: float = 1.0,
        max_vm_steps: int = 10_000_000,
    ) -> None:
        self.split = split
        self.difficulty = _check_difficulty(difficulty)
        self.schemas = _check_schemas(schemas)
        _check_settings(split, max_rows, timeout_s, max_vm_steps)
        self.max_rows = max_rows
        self.timeout_s = float(timeout_s)
        self.max_vm_steps = max_vm_steps
        self._database: ReadOnlyDatabase | None = None
        self._database_key: tuple[str, int] | None = None
        self._listed = False
        self._described: set[str] = set()
        tools = [
            Tool(self.list_tables),
            Tool(self.describe_table),
            Tool(self.run_query),
            Tool(self.submit),
        ]
        super().__init__(tools=tools, max_turns=max_turns)

    # --- tools -------------------------------------------------------------------

    def list_tables(self) -> str:
        """List the tables of the database, with their row counts."""
        self._listed = True
        return "\n".join(
            f"{table.name} ({self._row_count(table.name)} rows)" for table in self._schema.tables
        )

    def describe_table(self, name: str) -> str:
        """Show a table's columns with their types, and its first 3 rows.

        Args:
            name: The table's name, as list_tables shows it.
        """
        table = next((t for t in self._schema.tables if t.name == name.strip().lower()), None)
        if table is None:
            names = ", ".join(t.name for t in self._schema.tables)
            return f"Error: no table named {_quote(name)}; the tables are: {names}."
        self._described.add(table.name)
        columns, rows, _ = self.database.query(
            f"SELECT * FROM {table.name} LIMIT {SAMPLE_ROWS}", SAMPLE_ROWS, timed=False
        )
        lines = [f"Table {table.name} ({self._row_count(table.name)} rows), columns:"]
        lines += [f"  {column.declaration()}" for column in table.columns]
        lines.append(f"First {SAMPLE_ROWS} rows:")
        lines.append(format_result(columns, rows, more=False).rsplit("\n", 1)[0])
        return "\n".join(lines)

    def run_query(self, sql: str) -> str:
        """Run a read-only SQLite query and see its first rows.

        Args:
            sql: One SELECT statement.
        """
        try:
            return format_result(*self.database.query(sql, self.max_rows))
        except QueryError as e:
            return _error(f"SQL error: {e}")

    def submit(self, sql: str) -> str:
        """Submit the query that answers the question. This ends the episode.

        Args:
            sql: One SELECT statement whose rows answer the question.
        """
        try:
            _, rows, more = self.database.query(sql, MAX_SUBMIT_ROWS)
        except QueryError as e:
            return _error(f"SQL error: {e}. Nothing was submitted; fix the query and submit again")
        correct = not more and results_match(rows, self.task.expected, self.task.ordered)
        self._end_episode(reward=1.0 if correct else 0.0, success=correct)
        return "Correct." if correct else "Incorrect: the rows differ from the expected ones."

    # --- ToolEnv -----------------------------------------------------------------

    @property
    def task(self) -> SqlTask:
        return super().task  # type: ignore[return-value]

    @property
    def database(self) -> ReadOnlyDatabase:
        """The current episode's database."""
        if self._database is None:
            raise RuntimeError("No database yet: call reset() first.")
        return self._database

    def _generate_task(self, rng: np.random.Generator) -> SqlTask:
        for _ in range(MAX_DRAWS):
            schema = SCHEMAS[self.schemas[int(rng.integers(len(self.schemas)))]]
            difficulty = self.difficulty[int(rng.integers(len(self.difficulty)))]
            templates = [t for t in schema.templates if t.difficulty == difficulty]
            template = templates[int(rng.integers(len(templates)))]
            data_seed = int(rng.integers(NUM_DATA_SEEDS))
            # Names only among those the database holds: drawn from the whole pool, most
            # would be rejected below as degenerate, and templates with a few fixed values
            # (years, statuses) would crowd out the others.
            held = _text_values(_rows(schema.name, data_seed))
            values = {}
            for k, options in template.params.items():
                present = [v for v in options if not isinstance(v, str) or v in held] or options
                values[k] = present[int(rng.integers(len(present)))]
            if split_of(_question_key(schema, template, values)) != self.split:
                continue
            task = self._make_task(schema, data_seed, template, values)
            if not is_degenerate(task.expected):
                return task
        raise RuntimeError(
            f"Found no {self.split!r} task in {MAX_DRAWS} draws for difficulty "
            f"{list(self.difficulty)} and schemas {list(self.schemas)}"
        )

    def _task_from_id(self, task_id: str) -> SqlTask:
        schema, data_seed, template, values = self._parse_task_id(task_id)
        if split_of(_question_key(schema, template, values)) != self.split:
            raise ValueError(
                f"Task id {task_id!r:.200} cannot be posed by this environment: its question "
                f"belongs to the {split_of(_question_key(schema, template, values))!r} split, "
                f"not {self.split!r}"
            )
        task = self._make_task(schema, data_seed, template, values)
        if is_degenerate(task.expected):
            raise ValueError(
                f"Task id {task_id!r:.200} cannot be posed by this environment: on this database "
                "the answer is empty or all zeros, which a trivial query would match"
            )
        return task

    def _start_episode(self, task: Task) -> None:
        assert isinstance(task, SqlTask)
        self._database_for(task.schema, task.data_seed)
        self._listed = False
        self._described = set()

    def oracle_action(self) -> str:
        """Lists the tables, describes those the gold query reads, then submits it."""
        if self._terminated or self._truncated:
            raise RuntimeError("The episode is over: the oracle has no next action; call reset().")
        missing = [t for t in self.task.tables if t not in self._described]
        last_turn = self._turn + 1 >= self.max_turns
        if last_turn or (self._listed and not missing):
            return format_tool_call("submit", {"sql": self.task.gold_sql})
        if not self._listed:
            return format_tool_call("list_tables", {})
        return "\n".join(format_tool_call("describe_table", {"name": t}) for t in missing)

    def close(self) -> None:
        if self._database is not None:
            self._database.close()
            self._database, self._database_key = None, None
        super().close()

    # --- tasks -------------------------------------------------------------------

    @property
    def _schema(self) -> Schema:
        return SCHEMAS[self.task.schema]

    def _row_count(self, table: str) -> int:
        return self.database.query(f"SELECT COUNT(*) FROM {table}", 1, timed=False)[1][0][0]

    def _database_for(self, schema: str, data_seed: int) -> ReadOnlyDatabase:
        """The database of `(schema, data_seed)`, reusing the last one built (it never changes)."""
        if self._database_key != (schema, data_seed):
            if self._database is not None:
                self._database.close()
            self._database = ReadOnlyDatabase(
                SCHEMAS[schema].tables,
                _rows(schema, data_seed),
                max_vm_steps=self.max_vm_steps,
                timeout_s=self.timeout_s,
            )
            self._database_key = (schema, data_seed)
        return self.database

    def _make_task(
        self, schema: Schema, data_seed: int, template: Template, values: dict[str, str | int]
    ) -> SqlTask:
        question, gold_sql = template.render(values)
        try:
            _, rows, _ = self._database_for(schema.name, data_seed).query(
                gold_sql, MAX_SUBMIT_ROWS, timed=False
            )
        except QueryError as e:  # a bug in a template, never the agent's doing
            raise RuntimeError(f"The gold query of {template.name!r} failed: {e}") from None
        params = ",".join(f"{k}={v}" for k, v in values.items())
        return SqlTask(
            task_id=f"sql:{schema.name}:{data_seed}:{template.name}:{params}",
            prompt=f"Database: {schema.name} (SQLite).\nQuestion: {question}",
            schema=schema.name,
            data_seed=data_seed,
            template=template.name,
            params=tuple(values.items()),
            gold_sql=gold_sql,
            expected=tuple(rows),
            ordered=template.ordered,
            tables=tuple(schema.tables_in(gold_sql)),
        )

    def _parse_task_id(self, task_id: str) -> tuple[Schema, int, Template, dict[str, str | int]]:
        """The parts of a task id this env can pose; ValueError naming what is wrong."""
        parts = task_id.split(":")
        if len(parts) != 5 or parts[0] != "sql":
            raise ValueError(
                f"Task id {task_id!r:.200} is not a SQL task id; expected "
                "'sql:<schema>:<data seed>:<template>:<name=value,...>'"
            )
        _, schema_name, seed_text, template_name, params_text = parts
        problem = f"Task id {task_id!r:.200} cannot be posed by this environment"
        if schema_name not in self.schemas:
            raise ValueError(
                f"{problem}: schema {schema_name!r} is not one of {list(self.schemas)}"
            )
        schema = SCHEMAS[schema_name]
        if not re.fullmatch(r"0|[1-9][0-9]{0,5}", seed_text):
            raise ValueError(f"{problem}: the data seed must be an int in [0, {NUM_DATA_SEEDS})")
        template = schema.template(template_name)
        if template is None:
            names = ", ".join(t.name for t in schema.templates)
            raise ValueError(f"{problem}: no template {template_name!r} in {schema_name}: {names}")
        if template.difficulty not in self.difficulty:
            raise ValueError(
                f"{problem}: its difficulty is {template.difficulty}, "
                f"not one of {list(self.difficulty)}"
            )
        return schema, int(seed_text), template, _parse_params(template, params_text, problem)


def _parse_params(template: Template, text: str, problem: str) -> dict[str, str | int]:
    """`{"city": "Lyon"}` from `"city=Lyon"`, each value checked against the template's."""
    expected = ",".join(f"{name}=<value>" for name in template.params)
    pairs = [item.split("=", 1) for item in text.split(",")] if text else []
    if [pair[0] for pair in pairs] != list(template.params) or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{problem}: expected parameters {expected!r}, got {text!r}")
    values: dict[str, str | int] = {}
    for name, given in pairs:
        match = [v for v in template.params[name] if str(v) == given]
        if not match:
            options = ", ".join(str(v) for v in template.params[name])
            raise ValueError(f"{problem}: {name}={given!r} is not one of: {options}")
        values[name] = match[0]
    return values


def _question_key(schema: Schema, template: Template, values: dict[str, str | int]) -> str:
    """What the split hashes: the question, without the data seed."""
    params = ",".join(f"{k}={v}" for k, v in values.items())
    return f"{schema.name}:{template.name}:{params}"


def _error(message: str) -> str:
    text = f"Error: {message}."
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _check_difficulty(difficulty: Any) -> tuple[int, ...]:
    levels = [difficulty] if _is_int(difficulty) else difficulty
    if (
        not isinstance(levels, Iterable)
        or isinstance(levels, str)
        or not (levels := list(levels))
        or not all(_is_int(level) and level in DIFFICULTIES for level in levels)
    ):
        raise ValueError(
            "Expect `difficulty` to be 1, 2, 3 or a non-empty list of them, "
            f"actually: {difficulty!r}"
        )
    return tuple(sorted(set(levels)))


def _check_schemas(schemas: Any) -> tuple[str, ...]:
    known = list(SCHEMAS)
    if (
        isinstance(schemas, str)
        or not isinstance(schemas, Iterable)
        or not (names := list(schemas))
        or not all(isinstance(n, str) and n in SCHEMAS for n in names)
    ):
        raise ValueError(
            f"Expect `schemas` to be a non-empty list of names from {known}, actually: {schemas!r}"
        )
    return tuple(n for n in known if n in names)


@functools.lru_cache(maxsize=4)
def _rows(schema: str, data_seed: int) -> dict[str, list[Row]]:
    """`SCHEMAS[schema].rows(data_seed)`, kept for the task draw and then the episode (read only)."""
    return SCHEMAS[schema].rows(data_seed)


def _text_values(tables: dict[str, list[Row]]) -> set[str]:
    """Every text value in the rows of `tables`."""
    return {value for rows in tables.values() for row in rows for value in row if isinstance(value, str)}


def _check_settings(split: Any, max_rows: Any, timeout_s: Any, max_vm_steps: Any) -> None:
    if split not in SPLITS:
        raise ValueError(f"Expect `split` to be 'train' or 'test', actually: {split!r}")
    if not _is_int(max_rows) or not 1 <= max_rows <= 1000:
        raise ValueError(f"Expect `max_rows` to be an int in [1, 1000], actually: {max_rows!r}")
    if (
        not isinstance(timeout_s, (int, float))
        or isinstance(timeout_s, bool)
        or not 0 < timeout_s <= 60
    ):
        raise ValueError(f"Expect `timeout_s` to be a number in (0, 60], actually: {timeout_s!r}")
    if not _is_int(max_vm_steps) or max_vm_steps < PROGRESS_INTERVAL:
        raise ValueError(
            f"Expect `max_vm_steps` to be an int >= {PROGRESS_INTERVAL}, actually: {max_vm_steps!r}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
