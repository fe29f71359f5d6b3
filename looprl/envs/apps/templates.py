"""Task templates of levels 1 and 2: each draws one task from a world, with its solution.

A template is a function `(world, rnd) -> Spec | None` (None when this world cannot
host it, e.g. nobody was paid lately). The `Spec` holds the task's content (`params`,
hashed for the train/test split), the prompt, the apps whose docs the expert reads, the
API calls that solve it, and for questions the answer and its check. Level 1 uses one
app and 1-2 calls; level 2 up to two apps and 2-5 calls (level 3: `compound.py`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from looprl.envs.apps.check import Loose, contains_all, digits_answer, number_answer, text_answer
from looprl.envs.apps.world import EMAIL_TEXTS, GROUPS, day

World = dict[str, Any]
Call = tuple[str, str, dict[str, Any]]
NEW_EVENTS = (
    "Call mom", "Vet appointment", "Flight to Lisbon", "Coffee with Sam",
    "Bank appointment", "Plumber visit", "Study session", "Dentist check-up",
)  # fmt: skip
NOTE_KINDS = (
    ("phone", "phone numbers", ("{G} phones", "{G} numbers", "Phone list: {g}")),
    ("email", "email addresses", ("{G} emails", "{G} addresses", "Email list: {g}")),
)


@dataclass(frozen=True)
class Spec:
    """One drawn task (see the module docstring)."""

    template: str
    params: dict[str, Any]
    prompt: str
    apps: tuple[str, ...]
    calls: tuple[Call, ...]
    answer: str | None = None
    check_answer: Callable[[str | None], bool] | None = None
    loose: Loose = field(default_factory=dict)


def time_of_day(rnd: random.Random) -> str:
    """A time on the hour or half hour between 08:00 and 18:30."""
    return f"{rnd.randint(8, 18):02d}:{rnd.choice((0, 30)):02d}"


def search(contact: dict[str, Any]) -> Call:
    """The call that looks `contact` up by name."""
    return ("contacts", "search", {"query": contact["name"]})


def members(world: World, group: str) -> list[dict[str, Any]]:
    """The contacts in `group`."""
    return [c for c in world["contacts"] if c["group"] == group]


def payments(world: World, direction: str, since: str) -> list[dict[str, Any]]:
    """Payments in `direction` on or after `since`, newest first (as `payments.list`)."""
    found = [p for p in world["payments"] if p["dir"] == direction and p["date"] >= since]
    return sorted(found, key=lambda p: (p["date"], p["id"]), reverse=True)


# --- level 1 ---------------------------------------------------------------------------


def add_event(world: World, rnd: random.Random) -> Spec:
    titles = [t for t in NEW_EVENTS if all(e["title"] != t for e in world["events"])]
    title, offset, time = rnd.choice(titles), rnd.randint(1, 7), time_of_day(rnd)
    when = "tomorrow" if offset == 1 else f"on {day(offset)}"
    event = {"title": title, "date": day(offset), "time": time}
    return Spec(
        "add_event", event, f"Add a calendar event '{title}' {when} at {time}.",
        apps=("calendar",), calls=(("calendar", "add", event),),
        loose={"events": {"mins": lambda mins: True}},  # the task names no duration
    )  # fmt: skip


def delete_event(world: World, rnd: random.Random) -> Spec:
    event = rnd.choice(world["events"])
    return Spec(
        "delete_event", {"title": event["title"]},
        f"Delete the event '{event['title']}' from my calendar.", apps=("calendar",),
        calls=(("calendar", "list", {}), ("calendar", "delete", {"event_id": event["id"]})),
    )  # fmt: skip


def move_file(world: World, rnd: random.Random) -> Spec:
    file = rnd.choice(world["files"])
    folder = rnd.choice([f["name"] for f in world["folders"] if f["name"] != file["folder"]])
    move = {"file_id": file["id"], "folder": folder}
    return Spec(
        "move_file", {"file": file["name"], "folder": folder},
        f"Move the file '{file['name']}' to the folder '{folder}'.", apps=("files",),
        calls=(("files", "list", {}), ("files", "move", move)),
    )  # fmt: skip


def delete_note(world: World, rnd: random.Random) -> Spec:
    note = rnd.choice(world["notes"])
    return Spec(
        "delete_note", {"title": note["title"]}, f"Delete my note titled '{note['title']}'.",
        apps=("notes",),
        calls=(("notes", "list", {}), ("notes", "delete", {"note_id": note["id"]})),
    )  # fmt: skip


def contact_field(world: World, rnd: random.Random) -> Spec:
    contact = rnd.choice(world["contacts"])
    key, label = rnd.choice((("phone", "phone number"), ("email", "email address")))
    check = digits_answer if key == "phone" else text_answer
    return Spec(
        "contact_field", {"name": contact["name"], "field": key},
        f"What is {contact['name']}'s {label}? Answer with just the {label}.",
        apps=("contacts",), calls=(search(contact),),
        answer=contact[key], check_answer=check(contact[key]),
    )  # fmt: skip


def count_events(world: World, rnd: random.Random) -> Spec:
    first, span = rnd.randint(-5, 12), rnd.choice((0, 0, 1, 2, 6))
    dates = [day(first + i) for i in range(span + 1)]
    count = sum(e["date"] in dates for e in world["events"])
    when = f"on {dates[0]}" if span == 0 else f"from {dates[0]} to {dates[-1]} (both included)"
    listing = ("calendar", "list", {"date": dates[0]} if span == 0 else {})
    return Spec(
        "count_events", {"first": dates[0], "last": dates[-1]},
        f"How many events are on my calendar {when}? Answer with just the number.",
        apps=("calendar",), calls=(listing,),
        answer=str(count), check_answer=number_answer(count),
    )  # fmt: skip


# --- level 2 ---------------------------------------------------------------------------


def email_contact(world: World, rnd: random.Random) -> Spec:
    contact, (subject, body) = rnd.choice(world["contacts"]), rnd.choice(EMAIL_TEXTS)
    send = {"to": contact["email"], "subject": subject, "body": body}
    return Spec(
        "email_contact", {"name": contact["name"], "subject": subject, "body": body},
        f'Email {contact["name"]} with the subject "{subject}" and the body "{body}"',
        apps=("contacts", "email"), calls=(search(contact), ("email", "send", send)),
    )  # fmt: skip


def pay_contact(world: World, rnd: random.Random) -> Spec:
    contact, amount = rnd.choice(world["contacts"]), rnd.randint(500, 8000) / 100
    note = rnd.choice(("lunch", "concert", "taxi", "flowers", "rent share"))
    send = {"to": contact["email"], "amount": amount, "note": note}
    return Spec(
        "pay_contact", {"name": contact["name"], "amount": amount, "note": note},
        f"Send ${amount:.2f} to {contact['name']} with the note '{note}'.",
        apps=("contacts", "payments"), calls=(search(contact), ("payments", "send", send)),
    )  # fmt: skip


def total_paid(world: World, rnd: random.Random) -> Spec | None:
    days = rnd.choice((7, 14, 30))
    paid = payments(world, "out", day(-days))
    if not paid:
        return None
    email = rnd.choice(paid)["with"]
    contact = next(c for c in world["contacts"] if c["email"] == email)
    total = round(sum(p["amount"] for p in paid if p["with"] == email), 2)
    listing = ("payments", "list", {"since": day(-days), "dir": "out", "with": email})
    return Spec(
        "total_paid", {"name": contact["name"], "days": days},
        f"How much did I pay {contact['name']} in total in the last {days} days "
        f"(since {day(-days)})? Answer with just the amount.",
        apps=("contacts", "payments"), calls=(search(contact), listing),
        answer=f"{total:.2f}", check_answer=number_answer(total),
    )  # fmt: skip


def delete_emails_from(world: World, rnd: random.Random) -> Spec | None:
    inbox = [e for e in world["emails"] if e["folder"] == "inbox"]
    inbox.sort(key=lambda e: (e["date"], e["id"]), reverse=True)  # as email.list shows them
    counts = {c["email"]: sum(e["from"] == c["email"] for e in inbox) for c in world["contacts"]}
    senders = [c for c in world["contacts"] if 1 <= counts[c["email"]] <= 3]
    if not senders:
        return None
    contact = rnd.choice(senders)
    theirs = [e for e in inbox if e["from"] == contact["email"]]
    deletes = [("email", "delete", {"email_id": e["id"]}) for e in theirs]
    return Spec(
        "delete_emails_from", {"name": contact["name"]},
        f"Delete all emails from {contact['name']} in my inbox.", apps=("contacts", "email"),
        calls=(search(contact), ("email", "list", {"sender": contact["email"]}), *deletes),
    )  # fmt: skip


def reschedule(world: World, rnd: random.Random) -> Spec | None:
    upcoming = [e for e in world["events"] if e["date"] >= day(0)]
    if not upcoming:
        return None
    event = rnd.choice(upcoming)
    date = rnd.choice([day(o) for o in range(1, 13) if day(o) != event["date"]])
    update = {"event_id": event["id"], "date": date, "time": time_of_day(rnd)}
    return Spec(
        "reschedule", {"title": event["title"], "date": date, "time": update["time"]},
        f"Move my event '{event['title']}' to {date} at {update['time']}.", apps=("calendar",),
        calls=(("calendar", "list", {}), ("calendar", "update", update)),
    )  # fmt: skip


def group_note(world: World, rnd: random.Random) -> Spec | None:
    group, (key, label, titles) = rnd.choice(GROUPS), rnd.choice(NOTE_KINDS)
    people = members(world, group)
    if not 2 <= len(people) <= 6:
        return None
    title = rnd.choice(titles).format(G=group.capitalize(), g=group)
    note = {"title": title, "body": "\n".join(f"{c['name']}: {c[key]}" for c in people)}
    return Spec(
        "group_note", {"group": group, "field": key, "title": title},
        f"Save the {label} of everyone in my '{group}' contacts group to a new note titled "
        f"'{title}'.", apps=("contacts", "notes"),
        calls=(("contacts", "search", {"group": group}), ("notes", "create", note)),
        loose={"notes": {"body": contains_all([c[key] for c in people])}},  # any layout
    )  # fmt: skip
