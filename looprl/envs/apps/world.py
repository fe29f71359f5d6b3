"""The simulated world of apps: one user's contacts, calendar, email, notes, files, payments.

A world is a plain dict of lists of records (JSON types only), so it can be deep-copied,
snapshotted and diffed. `build_world(rnd)` draws one from a `random.Random`, with
dates relative to the fixed `TODAY`. Every record has an `id` from one counter shared by
all apps (`next_id`), so an id names one thing across the whole world.
"""

from __future__ import annotations

import datetime
import random
from typing import Any

TODAY = datetime.date(2024, 5, 15)
TODAY_TEXT = "Wednesday 2024-05-15"
GROUPS = ("family", "friends", "work")
APPS = ("contacts", "calendar", "email", "notes", "files", "payments")
COLLECTIONS = ("contacts", "events", "emails", "notes", "folders", "files", "payments")

FIRST_NAMES = (
    "Ana", "Bob", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jamal",
    "Kira", "Liam", "Maya", "Nico", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara",
    "Umar", "Vera", "Wes", "Ximena", "Yuki", "Zane", "Aisha", "Ben", "Chloe", "Dmitri",
)  # fmt: skip
LAST_NAMES = (
    "Lopez", "Smith", "Nguyen", "Garcia", "Khan", "Muller", "Rossi", "Silva", "Kim",
    "Okafor", "Dubois", "Novak", "Tanaka", "Cohen", "Larsen", "Patel", "Reyes", "Brown",
    "Ivanova", "Moreau",
)  # fmt: skip
DOMAINS = ("mail.com", "inbox.org", "post.net")
EVENT_TITLES = (
    "Team sync", "Yoga", "Dentist", "Book club", "Gym", "Lunch with Ana", "Project review",
    "Piano lesson", "Haircut", "Standup", "Doctor", "Dinner party", "Budget meeting",
    "Car service", "Movie night", "Tennis", "1:1 with manager", "Parent meeting",
    "Choir practice", "Sprint planning", "Physio", "Swim class", "Design review",
    "Language class", "Volunteer shift", "Board games", "Interview", "Eye exam",
)  # fmt: skip
EMAIL_TEXTS = (
    ("Lunch?", "Are you free for lunch this week?"),
    ("Photos", "Here are the photos from the trip."),
    ("Invoice", "Please find the invoice attached."),
    ("Meeting notes", "Notes from today's meeting are in the shared folder."),
    ("Weekend", "Any plans for the weekend?"),
    ("Birthday", "Don't forget the party on Saturday!"),
    ("Question", "Could you send me the report?"),
    ("Thanks", "Thanks for your help yesterday."),
    ("Tickets", "I booked the concert tickets."),
    ("Reminder", "The deadline is next Friday."),
    ("Dinner", "Dinner at our place on Sunday?"),
    ("Running late", "Running late, see you in 20 minutes."),
    ("Hike", "Want to join the hike on Saturday morning?"),
    ("Slides", "The slides for Monday are ready."),
    ("Congrats", "Congratulations on the new job!"),
    ("Keys", "I left the spare keys with the neighbour."),
)
NOTE_TEXTS = (
    ("Groceries", "milk, eggs, bread, apples"),
    ("Gift ideas", "book for Tara, scarf for mom"),
    ("Packing list", "passport, charger, sunscreen"),
    ("Books to read", "Dune; Middlemarch; The Overstory"),
    ("Recipes", "pasta with lemon and garlic"),
    ("Passwords hint", "ask the password manager"),
    ("Workout plan", "run Mon, swim Wed, lift Fri"),
    ("Movie list", "Alien, Amelie, Heat"),
    ("Meeting prep", "agenda, budget, hiring"),
    ("Garden", "plant tomatoes, fix the fence"),
    ("Podcasts", "Radiolab, 99% Invisible"),
    ("Trip ideas", "Porto, Kyoto, Oaxaca"),
    ("Car", "oil change due in June"),
    ("Wifi", "network: home5G"),
    ("Birthdays", "mom 3 Aug, Ben 12 Oct"),
    ("Quotes", "stay hungry, stay foolish"),
    ("House chores", "vacuum, laundry, windows"),
    ("Work goals", "ship v2, mentor an intern"),
)
FOLDERS = ("Documents", "Photos", "Taxes", "Work", "Old", "Travel", "Music")
FILE_NAMES = (
    "resume.pdf", "taxes_2023.pdf", "beach.jpg", "budget.xlsx", "lease.pdf", "notes.txt",
    "passport.png", "slides.pptx", "song.mp3", "invoice_42.pdf", "plan.docx", "cat.jpg",
    "report_q1.pdf", "itinerary.pdf", "w2_2023.pdf", "recipe.txt", "logo.png", "contract.pdf",
)  # fmt: skip
PAYMENT_NOTES = ("dinner", "rent", "tickets", "groceries", "taxi", "gift", "coffee", "books")


def day(offset: int) -> str:
    """The ISO date `offset` days from `TODAY` (`day(1)` is tomorrow)."""
    return (TODAY + datetime.timedelta(days=offset)).isoformat()


def build_world(rnd: random.Random) -> dict[str, Any]:
    """Draws one world: a user and their apps' data, all from `rnd`."""
    world: dict[str, Any] = {"next_id": 1, "balance": round(rnd.uniform(800, 2000), 2)}
    world.update({name: [] for name in COLLECTIONS})
    names = rnd.sample([(first, last) for first in FIRST_NAMES for last in LAST_NAMES], rnd.randint(11, 20))
    user, people = names[0], names[1:]
    world["user"] = {"name": " ".join(user), "email": _email(user, "mail.com")}
    phones = rnd.sample(range(1000, 10000), len(people))
    for (first, last), phone in zip(people, phones, strict=True):
        group = rnd.choice((*GROUPS, None))
        contact = {"name": f"{first} {last}", "email": _email((first, last), rnd.choice(DOMAINS))}
        add(world, "contacts", **contact, phone=f"555-{phone}", group=group)
    _add_events(world, rnd)
    _add_emails(world, rnd)
    for title, body in rnd.sample(NOTE_TEXTS, rnd.randint(3, 7)):
        add(world, "notes", title=title, body=body)
    _add_files(world, rnd)
    _add_payments(world, rnd)
    return world


def add(world: dict[str, Any], collection: str, **fields: Any) -> dict[str, Any]:
    """Appends a record with the next id to `world[collection]` and returns it."""
    record = {"id": world["next_id"], **fields}
    world["next_id"] += 1
    world[collection].append(record)
    return record


def find(world: dict[str, Any], collection: str, record_id: int) -> dict[str, Any] | None:
    """The record of `collection` with id `record_id`, or None."""
    return next((r for r in world[collection] if r["id"] == record_id), None)


def _email(name: tuple[str, str], domain: str) -> str:
    return f"{name[0]}.{name[1]}@{domain}".lower()


def _add_events(world: dict[str, Any], rnd: random.Random) -> None:
    for title in rnd.sample(EVENT_TITLES, rnd.randint(5, 9)):
        add(
            world,
            "events",
            title=title,
            date=day(rnd.randint(-5, 12)),
            time=f"{rnd.randint(8, 18):02d}:{rnd.choice((0, 30)):02d}",
            mins=rnd.choice((30, 45, 60, 90)),
        )


def _add_emails(world: dict[str, Any], rnd: random.Random) -> None:
    me = world["user"]["email"]
    for folder, count in (("inbox", rnd.randint(8, 14)), ("sent", rnd.randint(2, 4))):
        for _ in range(count):
            other = rnd.choice(world["contacts"])["email"]
            subject, body = rnd.choice(EMAIL_TEXTS)
            sender, to = (other, me) if folder == "inbox" else (me, other)
            add(world, "emails", folder=folder, **{"from": sender, "to": to},
                subject=subject, body=body, date=day(rnd.randint(-20, 0)))  # fmt: skip


def _add_files(world: dict[str, Any], rnd: random.Random) -> None:
    folders = rnd.sample(FOLDERS, rnd.randint(3, 5))
    for name in folders:
        add(world, "folders", name=name)
    for name in rnd.sample(FILE_NAMES, rnd.randint(6, 12)):
        add(world, "files", name=name, folder=rnd.choice(folders), kb=rnd.randint(5, 5000))


def _add_payments(world: dict[str, Any], rnd: random.Random) -> None:
    for _ in range(rnd.randint(10, 18)):
        add(
            world,
            "payments",
            dir=rnd.choice(("in", "out")),
            **{"with": rnd.choice(world["contacts"])["email"]},
            amount=round(rnd.uniform(5, 150), 2),
            note=rnd.choice(PAYMENT_NOTES),
            date=day(rnd.randint(-30, 0)),
        )
