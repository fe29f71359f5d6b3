"""The databases and questions of `looprl/SQL-v0`.

Three schemas (a shop, a school, a library), each with a row generator and question
templates at three difficulties: 1 single-table filters and counts, 2 aggregation
(GROUP BY, HAVING) and ORDER BY ... LIMIT on one table, 3 joins across 2-3 tables.
Every template has a gold SQL query; its parameters come from fixed pools, of which each
database draws a few values (see `CITIES`), so a question is named by
`(schema, template, params)` and its database by a data seed.

Rows come from `Draw`, which uses only `random.Random.random()` on a string seed: the
one part of the standard library's generator Python promises to keep stable across
versions, so a task id names the same database on every install.
"""

from __future__ import annotations

import datetime
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Row = tuple[Any, ...]

# Each database draws its cities, categories, majors, countries and genres from these
# pools (`PER_DATABASE` of each; terms: 4 in a row), and a question names one its database
# holds (`SqlEnv._generate_task`). With six fixed values a slot, a small model learned each
# template's few values by heart instead of copying the one the question names, and
# missed every held-out question whose value that template had never shown it.
CITIES = (
    "Amiens", "Angers", "Annecy", "Avignon", "Bordeaux", "Brest", "Caen", "Dijon",
    "Grenoble", "Lille", "Limoges", "Lyon", "Marseille", "Metz", "Montpellier", "Mulhouse",
    "Nancy", "Nantes", "Nice", "Nimes", "Orleans", "Paris", "Perpignan", "Reims", "Rennes",
    "Rouen", "Strasbourg", "Toulon", "Toulouse", "Tours",
)  # fmt: skip
STATUSES = ("cancelled", "delivered", "pending", "shipped")
MAJORS = (
    "Anthropology", "Art", "Biology", "Chemistry", "Computing", "Economics", "Geography",
    "Geology", "History", "Law", "Linguistics", "Literature", "Mathematics", "Music",
    "Philosophy", "Physics", "Psychology", "Sociology",
)  # fmt: skip
TERMS = tuple(f"{year}-{season}" for year in range(2019, 2025) for season in ("spring", "fall"))
COUNTRIES = (
    "Argentina", "Australia", "Brazil", "Canada", "Chile", "Egypt", "France", "Germany",
    "Ghana", "India", "Ireland", "Italy", "Japan", "Kenya", "Mexico", "Nigeria", "Norway",
    "Peru", "Poland", "Portugal", "Spain", "Sweden", "Turkey", "Vietnam",
)  # fmt: skip
GENRES = (
    "adventure", "biography", "comedy", "crime", "drama", "fantasy", "history", "horror",
    "mystery", "philosophy", "poetry", "romance", "science", "thriller", "travel", "western",
)  # fmt: skip
PER_DATABASE = 6  # cities, categories, majors, countries and genres (terms: 4 in a row)

FIRST_NAMES = (
    "Ada", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
    "Keiko", "Liam", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara",
)  # fmt: skip
LAST_NAMES = (
    "Adams", "Bauer", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Haddad", "Ito",
    "Jensen", "Kowalski", "Lopez", "Martin", "Nguyen", "Okafor", "Petit", "Rossi", "Silva",
)  # fmt: skip
PEOPLE = tuple(f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES)
PRODUCT_NOUNS = {
    "audio": ("Speaker", "Headphones", "Radio", "Microphone"),
    "baby": ("Stroller", "Crib", "Rattle", "Bib"),
    "beauty": ("Hair Dryer", "Mirror", "Brush", "Perfume"),
    "bikes": ("Bell", "Pump", "Bike Lock", "Saddle"),
    "books": ("Atlas", "Cookbook", "Novel", "Guide"),
    "camping": ("Tent", "Lantern", "Sleeping Bag", "Stove"),
    "crafts": ("Easel", "Paint Set", "Yarn", "Glue Gun"),
    "games": ("Puzzle", "Card Game", "Board Game", "Dice Set"),
    "garden": ("Rake", "Planter", "Hose", "Shovel"),
    "kitchen": ("Kettle", "Blender", "Pan", "Toaster"),
    "lighting": ("Lamp", "Candle", "Bulb", "String Lights"),
    "music": ("Ukulele", "Harmonica", "Drum", "Metronome"),
    "office": ("Stapler", "Notebook", "Desk Lamp", "Pen Set"),
    "pets": ("Leash", "Cat Bed", "Bowl", "Aquarium"),
    "sports": ("Ball", "Racket", "Helmet", "Yoga Mat"),
    "tools": ("Hammer", "Drill", "Wrench", "Saw"),
    "toys": ("Kite", "Robot", "Yo-Yo", "Teddy Bear"),
    "travel": ("Suitcase", "Backpack", "Pillow", "Adapter"),
}
CATEGORIES = tuple(PRODUCT_NOUNS)
ADJECTIVES = ("Blue", "Classic", "Compact", "Deluxe", "Golden", "Quiet", "Red", "Swift")
TITLE_WORDS = ("Silent", "Hidden", "Last", "Broken", "Golden", "Endless", "Winter", "Lost")
TITLE_NOUNS = ("River", "Garden", "Star", "Map", "Letter", "Harbor", "Forest", "Clock", "Door")
COURSE_KINDS = ("Intro to", "Advanced", "Topics in", "Seminar in", "Lab in")


class Draw:
    """Seeded draws built on `random.Random.random()` alone (stable across Pythons).

    Args:
        seed: Any string; the same string gives the same draws.
    """

    def __init__(self, seed: str) -> None:
        self._random = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        """An int in `[low, high]`, both included."""
        return low + int(self._random.random() * (high - low + 1))

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.integer(0, len(options) - 1)]

    def chance(self, probability: float) -> bool:
        return self._random.random() < probability

    def sample(self, options: Sequence[Any], k: int) -> list[Any]:
        """`k` distinct items of `options` in random order (a partial Fisher-Yates)."""
        pool = list(options)
        for i in range(k):
            j = self.integer(i, len(pool) - 1)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]

    def date(self, first_year: int, last_year: int) -> str:
        """An ISO date (`YYYY-MM-DD`) in the given years; days 1-28 so every month has it."""
        year = self.integer(first_year, last_year)
        return f"{year}-{self.integer(1, 12):02d}-{self.integer(1, 28):02d}"


# --- schemas ------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A column: `name`, SQL `type`, and what it references (`"customers(id)"`), if any."""

    name: str
    type: str
    references: str = ""

    def declaration(self) -> str:
        """`name TYPE [PRIMARY KEY | REFERENCES t(c)]`, as in CREATE TABLE and describe."""
        if self.name == "id":
            return f"{self.name} {self.type} PRIMARY KEY"
        reference = f" REFERENCES {self.references}" if self.references else ""
        return f"{self.name} {self.type}{reference}"


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]

    def create_statement(self) -> str:
        body = ", ".join(column.declaration() for column in self.columns)
        return f"CREATE TABLE {self.name} ({body})"


@dataclass(frozen=True)
class Template:
    """A question with its gold query.

    Attributes:
        name: Unique within its schema; part of the task id.
        difficulty: 1 (one table), 2 (aggregation, ordering) or 3 (joins).
        question: `str.format` text over the parameters.
        sql: The gold query, `str.format` text over the parameters as SQL literals.
        params: Each parameter's possible values, in task-id order.
        ordered: The question asks for an order, so rows are compared as a list.
    """

    name: str
    difficulty: int
    question: str
    sql: str
    params: dict[str, tuple[str | int, ...]] = field(default_factory=dict)
    ordered: bool = False

    def render(self, values: dict[str, str | int]) -> tuple[str, str]:
        """`(question, gold sql)` for the parameter `values`."""
        literals = {name: sql_literal(value) for name, value in values.items()}
        return self.question.format(**values), self.sql.format(**literals)


@dataclass(frozen=True)
class Schema:
    """A database design: its tables, a row generator and its question templates."""

    name: str
    tables: tuple[Table, ...]
    generate: Callable[[Draw], dict[str, list[Row]]]
    templates: tuple[Template, ...]

    def rows(self, data_seed: int) -> dict[str, list[Row]]:
        """Every table's rows for `data_seed`, the same on every run."""
        return self.generate(Draw(f"{self.name}:{data_seed}"))

    def template(self, name: str) -> Template | None:
        return next((t for t in self.templates if t.name == name), None)

    def tables_in(self, sql: str) -> list[str]:
        """The tables a query names, in the order they first appear."""
        found = {t.name: m.start() for t in self.tables if (m := re.search(rf"\b{t.name}\b", sql))}
        return sorted(found, key=found.__getitem__)


def sql_literal(value: str | int) -> str:
    """`'Lyon'` for strings (quotes doubled), `2023` for ints.

    Example:
        >>> sql_literal("O'Hara"), sql_literal(3)
        ("'O''Hara'", '3')
    """
    return str(value) if isinstance(value, int) else "'" + value.replace("'", "''") + "'"


def _column(spec: str) -> Column:
    """`"customer_id INTEGER customers(id)"` -> a Column."""
    name, sql_type, *references = spec.split()
    return Column(name, sql_type, references[0] if references else "")


def _table(name: str, *specs: str) -> Table:
    return Table(name, tuple(_column(spec) for spec in specs))


def _numbered(rows: list[Row]) -> list[Row]:
    """Rows with ids 1..n put in front."""
    return [(i, *row) for i, row in enumerate(rows, start=1)]


# --- shop -----------------------------------------------------------------------------

SHOP_TABLES = (
    _table("customers", "id INTEGER", "name TEXT", "city TEXT", "signup_year INTEGER"),
    _table("products", "id INTEGER", "name TEXT", "category TEXT", "price REAL"),
    _table(
        "orders",
        "id INTEGER",
        "customer_id INTEGER customers(id)",
        "product_id INTEGER products(id)",
        "quantity INTEGER",
        "order_date TEXT",
        "status TEXT",
    ),
)


def _shop_rows(draw: Draw) -> dict[str, list[Row]]:
    people = draw.sample(PEOPLE, draw.integer(30, 40))
    cities = draw.sample(CITIES, PER_DATABASE)
    customers = [(name, draw.choice(cities), draw.integer(2019, 2024)) for name in people]
    catalog = [
        (c, f"{a} {n}")
        for c in sorted(draw.sample(CATEGORIES, PER_DATABASE))
        for n in PRODUCT_NOUNS[c]
        for a in ADJECTIVES
    ]
    products = [
        (name, category, draw.integer(299, 14999) / 100)
        for category, name in draw.sample(catalog, draw.integer(24, 30))
    ]
    statuses = ("delivered",) * 5 + ("shipped",) * 2 + ("pending", "cancelled")
    orders = [
        (
            draw.integer(1, len(customers)),
            draw.integer(1, len(products)),
            draw.integer(1, 5),
            draw.date(2021, 2024),
            draw.choice(statuses),
        )
        for _ in range(draw.integer(80, 110))
    ]
    orders.sort(key=lambda order: order[3])  # ids follow the order dates, as in a real shop
    return {
        "customers": _numbered(customers),
        "products": _numbered(products),
        "orders": _numbered(orders),
    }


YEARS = (2021, 2022, 2023, 2024)
SIGNUP_YEARS = (2020, 2021, 2022, 2023)
PRICES = (40, 80, 120)
# Difficulty 1 draws its numbers from wide ranges: with a handful of values a small model
# can memorise every question's query instead of learning to copy the question's values,
# and what it learns on training questions then does not carry to held-out ones.
PRICE_LIMITS = tuple(range(10, 151, 5))

SHOP_TEMPLATES = (
    # 1: one table, filters and counts
    Template(
        "customers_in_city",
        1,
        "How many customers live in {city}?",
        "SELECT COUNT(*) FROM customers WHERE city = {city}",
        {"city": CITIES},
    ),
    Template(
        "products_under_price",
        1,
        "List the names of the products in the '{category}' category that cost less than {price}.",
        "SELECT name FROM products WHERE category = {category} AND price < {price}",
        {"category": CATEGORIES, "price": PRICE_LIMITS},
    ),
    Template(
        "orders_with_status_in_year",
        1,
        "How many orders placed in {year} have the status '{status}'?",
        "SELECT COUNT(*) FROM orders WHERE status = {status} AND order_date LIKE '{year}-%'",
        {"status": STATUSES, "year": YEARS},
    ),
    Template(
        "customers_signed_up_since",
        1,
        "List the names of the customers from {city} who signed up in {year} or later.",
        "SELECT name FROM customers WHERE city = {city} AND signup_year >= {year}",
        {"city": CITIES, "year": SIGNUP_YEARS},
    ),
    Template(
        "max_price_in_category",
        1,
        "What is the price of the most expensive product in the '{category}' category?",
        "SELECT MAX(price) FROM products WHERE category = {category}",
        {"category": CATEGORIES},
    ),
    Template(
        "orders_with_quantity",
        1,
        "How many orders have a quantity of at least {quantity}?",
        "SELECT COUNT(*) FROM orders WHERE quantity >= {quantity}",
        {"quantity": (2, 3, 4, 5)},
    ),
    # 2: aggregation and ordering on one table
    Template(
        "customers_per_city_since",
        2,
        "For each city, how many customers signed up in {year} or later? "
        "Give the city and the count.",
        "SELECT city, COUNT(*) FROM customers WHERE signup_year >= {year} GROUP BY city",
        {"year": SIGNUP_YEARS},
    ),
    Template(
        "average_price_per_category_under",
        2,
        "For each category, what is the average price of its products that cost less "
        "than {price}? Give the category and the average.",
        "SELECT category, AVG(price) FROM products WHERE price < {price} GROUP BY category",
        {"price": PRICES},
    ),
    Template(
        "most_expensive_in_category",
        2,
        "List the names and prices of the {k} most expensive products in the '{category}' "
        "category, most expensive first (break ties by name).",
        "SELECT name, price FROM products WHERE category = {category} "
        "ORDER BY price DESC, name LIMIT {k}",
        {"category": CATEGORIES, "k": (2, 3)},
        ordered=True,
    ),
    Template(
        "cheapest_products",
        2,
        "List the names and prices of the {k} cheapest products, cheapest first "
        "(break ties by name).",
        "SELECT name, price FROM products ORDER BY price, name LIMIT {k}",
        {"k": (3, 4, 5)},
        ordered=True,
    ),
    Template(
        "orders_per_status_in_year",
        2,
        "For each status, how many orders were placed in {year}? Give the status and the count.",
        "SELECT status, COUNT(*) FROM orders WHERE order_date LIKE '{year}-%' GROUP BY status",
        {"year": YEARS},
    ),
    Template(
        "categories_with_many_products",
        2,
        "Which categories have at least {n} products? Give each category and its number "
        "of products.",
        "SELECT category, COUNT(*) FROM products GROUP BY category HAVING COUNT(*) >= {n}",
        {"n": (3, 4, 5, 6)},
    ),
    Template(
        "quantity_stats_in_year",
        2,
        "For the orders placed in {year}, what are the smallest, the largest and the "
        "average quantity?",
        "SELECT MIN(quantity), MAX(quantity), AVG(quantity) FROM orders "
        "WHERE order_date LIKE '{year}-%'",
        {"year": YEARS},
    ),
    # 3: joins
    Template(
        "orders_from_city_in_category",
        3,
        "How many orders of products in the '{category}' category were placed by "
        "customers from {city}?",
        "SELECT COUNT(*) FROM orders JOIN customers ON customers.id = orders.customer_id "
        "JOIN products ON products.id = orders.product_id "
        "WHERE products.category = {category} AND customers.city = {city}",
        {"category": CATEGORIES, "city": CITIES},
    ),
    Template(
        "top_spenders",
        3,
        "Which {k} customers spent the most on '{status}' orders (the sum of quantity "
        "times price)? Give each name and total, highest first (break ties by name).",
        "SELECT customers.name, SUM(orders.quantity * products.price) AS total FROM orders "
        "JOIN customers ON customers.id = orders.customer_id "
        "JOIN products ON products.id = orders.product_id WHERE orders.status = {status} "
        "GROUP BY customers.id ORDER BY total DESC, customers.name LIMIT {k}",
        {"k": (3, 5), "status": ("delivered", "shipped")},
        ordered=True,
    ),
    Template(
        "revenue_per_category_in_year",
        3,
        "What was the revenue (the sum of quantity times price) of each product category "
        "in {year}, not counting cancelled orders? Give the category and the revenue.",
        "SELECT products.category, SUM(orders.quantity * products.price) FROM orders "
        "JOIN products ON products.id = orders.product_id "
        "WHERE orders.order_date LIKE '{year}-%' AND orders.status != 'cancelled' "
        "GROUP BY products.category",
        {"year": YEARS},
    ),
    Template(
        "customers_without_status",
        3,
        "Which customers from {city} have no orders with the status '{status}'? Give their names.",
        "SELECT name FROM customers WHERE city = {city} AND id NOT IN "
        "(SELECT customer_id FROM orders WHERE status = {status})",
        {"city": CITIES, "status": STATUSES},
    ),
    Template(
        "best_seller_in_category",
        3,
        "Which product in the '{category}' category sold the most units (total quantity) "
        "in {year}? Give its name and the units (on a tie, the name first in "
        "alphabetical order).",
        "SELECT products.name, SUM(orders.quantity) AS units FROM orders "
        "JOIN products ON products.id = orders.product_id "
        "WHERE products.category = {category} AND orders.order_date LIKE '{year}-%' "
        "GROUP BY products.id ORDER BY units DESC, products.name LIMIT 1",
        {"category": CATEGORIES, "year": YEARS},
        ordered=True,
    ),
    Template(
        "orders_per_city_in_year",
        3,
        "How many orders did the customers from each city place in {year}? "
        "Give the city and the count.",
        "SELECT customers.city, COUNT(*) FROM orders "
        "JOIN customers ON customers.id = orders.customer_id "
        "WHERE orders.order_date LIKE '{year}-%' GROUP BY customers.city",
        {"year": YEARS},
    ),
)


# --- school ---------------------------------------------------------------------------

SCHOOL_TABLES = (
    _table("students", "id INTEGER", "name TEXT", "major TEXT", "study_year INTEGER"),
    _table("courses", "id INTEGER", "title TEXT", "department TEXT", "credits INTEGER"),
    _table(
        "enrollments",
        "id INTEGER",
        "student_id INTEGER students(id)",
        "course_id INTEGER courses(id)",
        "term TEXT",
        "grade INTEGER",
    ),
)


def _school_rows(draw: Draw) -> dict[str, list[Row]]:
    people = draw.sample(PEOPLE, draw.integer(40, 55))
    majors = sorted(draw.sample(MAJORS, PER_DATABASE))
    first_term = draw.integer(0, len(TERMS) - 4)
    terms = TERMS[first_term : first_term + 4]
    students = [(name, draw.choice(majors), draw.integer(1, 4)) for name in people]
    catalog = [(f"{kind} {major}", major) for major in majors for kind in COURSE_KINDS]
    courses = [
        (title, department, draw.integer(2, 6))
        for title, department in draw.sample(catalog, draw.integer(16, 20))
    ]
    pairs = [(s, c) for s in range(1, len(students) + 1) for c in range(1, len(courses) + 1)]
    enrollments = [
        (s, c, draw.choice(terms), None if draw.chance(0.1) else draw.integer(35, 100))
        for s, c in draw.sample(pairs, draw.integer(130, 170))
    ]
    enrollments.sort(key=lambda e: (TERMS.index(e[2]), e[0], e[1]))
    return {
        "students": _numbered(students),
        "courses": _numbered(courses),
        "enrollments": _numbered(enrollments),
    }


STUDY_YEARS = (1, 2, 3, 4)
GRADE_LIMITS = (50, 60, 70)
LOW_GRADE_LIMITS = tuple(range(40, 100))  # difficulty 1 (see PRICE_LIMITS)

SCHOOL_TEMPLATES = (
    # 1: one table, filters and counts
    Template(
        "students_in_major_and_year",
        1,
        "How many {major} students are in study year {year}?",
        "SELECT COUNT(*) FROM students WHERE major = {major} AND study_year = {year}",
        {"major": MAJORS, "year": STUDY_YEARS},
    ),
    Template(
        "names_in_major_and_year",
        1,
        "List the names of the students majoring in {major} who are in study year {year}.",
        "SELECT name FROM students WHERE major = {major} AND study_year = {year}",
        {"major": MAJORS, "year": STUDY_YEARS},
    ),
    Template(
        "courses_with_credits",
        1,
        "List the titles of the {department} courses worth at least {credits} credits.",
        "SELECT title FROM courses WHERE department = {department} AND credits >= {credits}",
        {"department": MAJORS, "credits": (3, 4, 5)},
    ),
    Template(
        "ungraded_in_term",
        1,
        "How many enrollments in the term '{term}' have no grade yet?",
        "SELECT COUNT(*) FROM enrollments WHERE term = {term} AND grade IS NULL",
        {"term": TERMS},
    ),
    Template(
        "highest_grade_in_term",
        1,
        "What was the highest grade given in the term '{term}'?",
        "SELECT MAX(grade) FROM enrollments WHERE term = {term}",
        {"term": TERMS},
    ),
    Template(
        "low_grades_in_term",
        1,
        "How many grades below {grade} were given in the term '{term}'?",
        "SELECT COUNT(*) FROM enrollments WHERE term = {term} AND grade < {grade}",
        {"grade": LOW_GRADE_LIMITS, "term": TERMS},
    ),
    # 2: aggregation and ordering on one table
    Template(
        "students_per_major_in_year",
        2,
        "For each major, how many students are in study year {year}? Give the major and the count.",
        "SELECT major, COUNT(*) FROM students WHERE study_year = {year} GROUP BY major",
        {"year": STUDY_YEARS},
    ),
    Template(
        "students_per_year_in_major",
        2,
        "For each study year, how many {major} students are there? "
        "Give the study year and the count.",
        "SELECT study_year, COUNT(*) FROM students WHERE major = {major} GROUP BY study_year",
        {"major": MAJORS},
    ),
    Template(
        "good_grades_per_term",
        2,
        "For each term, how many enrollments got a grade of at least {grade}? "
        "Give the term and the count.",
        "SELECT term, COUNT(*) FROM enrollments WHERE grade >= {grade} GROUP BY term",
        {"grade": (60, 70, 80, 90)},
    ),
    Template(
        "departments_with_many_courses",
        2,
        "Which departments offer at least {n} courses? Give each department and its "
        "number of courses.",
        "SELECT department, COUNT(*) FROM courses GROUP BY department HAVING COUNT(*) >= {n}",
        {"n": (2, 3, 4)},
    ),
    Template(
        "credits_per_department",
        2,
        "For each department, what is the total number of credits of its courses worth "
        "at least {credits} credits? Give the department and the total.",
        "SELECT department, SUM(credits) FROM courses WHERE credits >= {credits} "
        "GROUP BY department",
        {"credits": (3, 4, 5)},
    ),
    Template(
        "courses_with_most_credits",
        2,
        "List the titles and credits of the {k} courses worth the most credits, most "
        "credits first (break ties by title).",
        "SELECT title, credits FROM courses ORDER BY credits DESC, title LIMIT {k}",
        {"k": (3, 4, 5)},
        ordered=True,
    ),
    Template(
        "grade_stats_in_term",
        2,
        "What were the lowest, the highest and the average grade in the term '{term}' "
        "(ignoring missing grades)?",
        "SELECT MIN(grade), MAX(grade), AVG(grade) FROM enrollments WHERE term = {term}",
        {"term": TERMS},
    ),
    # 3: joins
    Template(
        "students_in_department_and_term",
        3,
        "How many different students took a {department} course in the term '{term}'?",
        "SELECT COUNT(DISTINCT enrollments.student_id) FROM enrollments "
        "JOIN courses ON courses.id = enrollments.course_id "
        "WHERE courses.department = {department} AND enrollments.term = {term}",
        {"department": MAJORS, "term": TERMS},
    ),
    Template(
        "best_students_in_major",
        3,
        "Which {k} {major} students have the highest average grade (ignoring missing "
        "grades)? Give each name and average, highest first (break ties by name).",
        "SELECT students.name, AVG(enrollments.grade) AS average FROM students "
        "JOIN enrollments ON enrollments.student_id = students.id "
        "WHERE students.major = {major} AND enrollments.grade IS NOT NULL "
        "GROUP BY students.id ORDER BY average DESC, students.name LIMIT {k}",
        {"k": (2, 3), "major": MAJORS},
        ordered=True,
    ),
    Template(
        "course_averages_in_department",
        3,
        "For each {department} course with at least one grade, give its title and its "
        "average grade (ignoring missing grades).",
        "SELECT courses.title, AVG(enrollments.grade) FROM courses "
        "JOIN enrollments ON enrollments.course_id = courses.id "
        "WHERE courses.department = {department} AND enrollments.grade IS NOT NULL "
        "GROUP BY courses.id",
        {"department": MAJORS},
    ),
    Template(
        "low_grades_in_department",
        3,
        "Which students got a grade below {grade} in a {department} course? Give each name once.",
        "SELECT DISTINCT students.name FROM students "
        "JOIN enrollments ON enrollments.student_id = students.id "
        "JOIN courses ON courses.id = enrollments.course_id "
        "WHERE courses.department = {department} AND enrollments.grade < {grade}",
        {"department": MAJORS, "grade": (50, 60)},
    ),
    Template(
        "most_credits_in_term",
        3,
        "Which {k} students enrolled in the most credits in the term '{term}'? Give each "
        "name and the credits, most first (break ties by name).",
        "SELECT students.name, SUM(courses.credits) AS total FROM enrollments "
        "JOIN students ON students.id = enrollments.student_id "
        "JOIN courses ON courses.id = enrollments.course_id WHERE enrollments.term = {term} "
        "GROUP BY students.id ORDER BY total DESC, students.name LIMIT {k}",
        {"k": (3, 5), "term": TERMS},
        ordered=True,
    ),
    Template(
        "enrollments_per_department_in_term",
        3,
        "For each department, how many enrollments did its courses have in the term "
        "'{term}'? Give the department and the count.",
        "SELECT courses.department, COUNT(*) FROM enrollments "
        "JOIN courses ON courses.id = enrollments.course_id "
        "WHERE enrollments.term = {term} GROUP BY courses.department",
        {"term": TERMS},
    ),
)


# --- library --------------------------------------------------------------------------

LIBRARY_TABLES = (
    _table("authors", "id INTEGER", "name TEXT", "country TEXT"),
    _table(
        "books",
        "id INTEGER",
        "title TEXT",
        "author_id INTEGER authors(id)",
        "genre TEXT",
        "published_year INTEGER",
        "pages INTEGER",
    ),
    _table("members", "id INTEGER", "name TEXT", "city TEXT"),
    _table(
        "loans",
        "id INTEGER",
        "book_id INTEGER books(id)",
        "member_id INTEGER members(id)",
        "loan_date TEXT",
        "return_date TEXT",
    ),
)


def _library_rows(draw: Draw) -> dict[str, list[Row]]:
    people = draw.sample(PEOPLE, draw.integer(36, 48))
    num_authors = draw.integer(12, 18)
    countries = draw.sample(COUNTRIES, PER_DATABASE)
    cities = draw.sample(CITIES, PER_DATABASE)
    genres = draw.sample(GENRES, PER_DATABASE)
    authors = [(name, draw.choice(countries)) for name in people[:num_authors]]
    members = [(name, draw.choice(cities)) for name in people[num_authors:]]
    catalog = [f"The {word} {noun}" for word in TITLE_WORDS for noun in TITLE_NOUNS]
    books = [
        (
            title,
            draw.integer(1, len(authors)),
            draw.choice(genres),
            draw.integer(1950, 2023),
            draw.integer(80, 900),
        )
        for title in draw.sample(catalog, draw.integer(30, 42))
    ]
    loans = [
        (draw.integer(1, len(books)), draw.integer(1, len(members)), draw.date(2022, 2024))
        for _ in range(draw.integer(70, 100))
    ]
    loans.sort(key=lambda loan: loan[2])
    return {
        "authors": _numbered(authors),
        "books": _numbered(books),
        "members": _numbered(members),
        "loans": _numbered([(*loan, _return_date(draw, loan[2])) for loan in loans]),
    }


def _return_date(draw: Draw, loan_date: str) -> str | None:
    """None (not returned yet) one time in five, else 1-60 days after the loan."""
    if draw.chance(0.2):
        return None
    days = draw.integer(1, 60)
    return (datetime.date.fromisoformat(loan_date) + datetime.timedelta(days=days)).isoformat()


LOAN_YEARS = (2022, 2023, 2024)
PUBLISHED_YEARS = (1970, 1990, 2000, 2010)
PUBLISHED_AFTER = tuple(range(1950, 2021))  # difficulty 1 (see PRICE_LIMITS)
PAGE_LIMITS = tuple(range(100, 851, 10))

LIBRARY_TEMPLATES = (
    # 1: one table, filters and counts
    Template(
        "genre_books_after_year",
        1,
        "How many '{genre}' books were published after {year}?",
        "SELECT COUNT(*) FROM books WHERE genre = {genre} AND published_year > {year}",
        {"genre": GENRES, "year": PUBLISHED_AFTER},
    ),
    Template(
        "long_books_in_genre",
        1,
        "List the titles of the '{genre}' books with more than {pages} pages.",
        "SELECT title FROM books WHERE genre = {genre} AND pages > {pages}",
        {"genre": GENRES, "pages": PAGE_LIMITS},
    ),
    Template(
        "open_loans_in_year",
        1,
        "How many loans made in {year} have not been returned yet?",
        "SELECT COUNT(*) FROM loans WHERE loan_date LIKE '{year}-%' AND return_date IS NULL",
        {"year": LOAN_YEARS},
    ),
    Template(
        "authors_from_country",
        1,
        "List the names of the authors from {country}.",
        "SELECT name FROM authors WHERE country = {country}",
        {"country": COUNTRIES},
    ),
    Template(
        "members_in_city",
        1,
        "How many library members live in {city}?",
        "SELECT COUNT(*) FROM members WHERE city = {city}",
        {"city": CITIES},
    ),
    Template(
        "longest_book_in_genre",
        1,
        "How many pages does the longest '{genre}' book have?",
        "SELECT MAX(pages) FROM books WHERE genre = {genre}",
        {"genre": GENRES},
    ),
    # 2: aggregation and ordering on one table
    Template(
        "books_per_genre_since",
        2,
        "For each genre, how many books were published in {year} or later? "
        "Give the genre and the count.",
        "SELECT genre, COUNT(*) FROM books WHERE published_year >= {year} GROUP BY genre",
        {"year": PUBLISHED_YEARS},
    ),
    Template(
        "average_pages_per_genre_before",
        2,
        "For each genre, what is the average number of pages of the books published "
        "before {year}? Give the genre and the average.",
        "SELECT genre, AVG(pages) FROM books WHERE published_year < {year} GROUP BY genre",
        {"year": PUBLISHED_YEARS},
    ),
    Template(
        "long_books_per_genre",
        2,
        "For each genre, how many books have more than {pages} pages? "
        "Give the genre and the count.",
        "SELECT genre, COUNT(*) FROM books WHERE pages > {pages} GROUP BY genre",
        {"pages": (200, 400, 600)},
    ),
    Template(
        "oldest_books",
        2,
        "List the titles and publication years of the {k} oldest books, oldest first "
        "(break ties by title).",
        "SELECT title, published_year FROM books ORDER BY published_year, title LIMIT {k}",
        {"k": (3, 4, 5)},
        ordered=True,
    ),
    Template(
        "newest_in_genre",
        2,
        "List the titles of the {k} most recently published '{genre}' books, newest first "
        "(break ties by title).",
        "SELECT title FROM books WHERE genre = {genre} "
        "ORDER BY published_year DESC, title LIMIT {k}",
        {"genre": GENRES, "k": (2, 3)},
        ordered=True,
    ),
    Template(
        "countries_with_many_authors",
        2,
        "Which countries have at least {n} authors? Give each country and its number of authors.",
        "SELECT country, COUNT(*) FROM authors GROUP BY country HAVING COUNT(*) >= {n}",
        {"n": (2, 3, 4)},
    ),
    # 3: joins
    Template(
        "genre_books_from_country",
        3,
        "How many '{genre}' books were written by authors from {country}?",
        "SELECT COUNT(*) FROM books JOIN authors ON authors.id = books.author_id "
        "WHERE books.genre = {genre} AND authors.country = {country}",
        {"country": COUNTRIES, "genre": GENRES},
    ),
    Template(
        "most_borrowed_books",
        3,
        "Which {k} books were borrowed most often in {year}? Give each title and its "
        "number of loans, most borrowed first (break ties by title).",
        "SELECT books.title, COUNT(*) AS borrowed FROM loans "
        "JOIN books ON books.id = loans.book_id WHERE loans.loan_date LIKE '{year}-%' "
        "GROUP BY books.id ORDER BY borrowed DESC, books.title LIMIT {k}",
        {"k": (3, 5), "year": LOAN_YEARS},
        ordered=True,
    ),
    Template(
        "members_who_borrowed_genre",
        3,
        "Which members from {city} borrowed a '{genre}' book? Give each name once.",
        "SELECT DISTINCT members.name FROM members "
        "JOIN loans ON loans.member_id = members.id JOIN books ON books.id = loans.book_id "
        "WHERE members.city = {city} AND books.genre = {genre}",
        {"city": CITIES, "genre": GENRES},
    ),
    Template(
        "loans_per_author_country_in_year",
        3,
        "For each author country, how many loans made in {year} were of books by authors "
        "from that country? Give the country and the count.",
        "SELECT authors.country, COUNT(*) FROM loans JOIN books ON books.id = loans.book_id "
        "JOIN authors ON authors.id = books.author_id "
        "WHERE loans.loan_date LIKE '{year}-%' GROUP BY authors.country",
        {"year": LOAN_YEARS},
    ),
    Template(
        "unreturned_books_of_city",
        3,
        "Which books borrowed by members from {city} have not been returned yet? "
        "Give each title once.",
        "SELECT DISTINCT books.title FROM loans JOIN books ON books.id = loans.book_id "
        "JOIN members ON members.id = loans.member_id "
        "WHERE members.city = {city} AND loans.return_date IS NULL",
        {"city": CITIES},
    ),
    Template(
        "prolific_authors",
        3,
        "Which authors have written at least {n} books? Give each name and number of "
        "books, most books first (break ties by name).",
        "SELECT authors.name, COUNT(*) AS written FROM authors "
        "JOIN books ON books.author_id = authors.id GROUP BY authors.id "
        "HAVING COUNT(*) >= {n} ORDER BY written DESC, authors.name",
        {"n": (2, 3, 4)},
        ordered=True,
    ),
)

SCHEMAS = {
    schema.name: schema
    for schema in (
        Schema("shop", SHOP_TABLES, _shop_rows, SHOP_TEMPLATES),
        Schema("school", SCHOOL_TABLES, _school_rows, SCHOOL_TEMPLATES),
        Schema("library", LIBRARY_TABLES, _library_rows, LIBRARY_TEMPLATES),
    )
}
