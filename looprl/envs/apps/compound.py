"""Task templates of level 3: several apps, or one lookup then many writes (2-6 API calls).

See `templates.py` for what a template is.
"""

from __future__ import annotations

import random

from looprl.envs.apps.check import contains_all, number_answer
from looprl.envs.apps.templates import Spec, World, members, payments, search
from looprl.envs.apps.world import EMAIL_TEXTS, GROUPS, day

NEW_FOLDERS = ("Archive", "Backup", "Shared", "To sort", "Old files", "Keep", "Review", "Later")
REFUND_NOTES = ("refund", "paying you back", "returned", "thanks, returning this", "back to you")


def pay_back(world: World, rnd: random.Random) -> Spec | None:
    days, note = rnd.choice((3, 5, 7, 10, 14)), rnd.choice(REFUND_NOTES)
    received = payments(world, "in", day(-days))
    if not 1 <= len(received) <= 4:
        return None
    sends = [
        ("payments", "send", {"to": p["with"], "amount": p["amount"], "note": note})
        for p in received
    ]
    return Spec(
        "pay_back", {"days": days, "note": note},
        f"For each payment I received in the last {days} days (since {day(-days)}), send the "
        f"same amount back to its sender with the note '{note}'.", apps=("payments",),
        calls=(("payments", "list", {"since": day(-days), "dir": "in"}), *sends),
    )  # fmt: skip


def email_group(world: World, rnd: random.Random) -> Spec | None:
    group, (subject, body) = rnd.choice(GROUPS), rnd.choice(EMAIL_TEXTS)
    people = members(world, group)
    if not 2 <= len(people) <= 5:
        return None
    message = {"subject": subject, "body": body}
    sends = [("email", "send", {"to": c["email"], **message}) for c in people]
    return Spec(
        "email_group", {"group": group, "subject": subject, "body": body},
        f'Email everyone in my \'{group}\' contacts group with the subject "{subject}" and '
        f'the body "{body}"', apps=("contacts", "email"),
        calls=(("contacts", "search", {"group": group}), *sends),
    )  # fmt: skip


def archive_folder(world: World, rnd: random.Random) -> Spec | None:
    source = rnd.choice(world["folders"])["name"]
    files = [f for f in world["files"] if f["folder"] == source]
    names = [n for n in NEW_FOLDERS if all(f["name"] != n for f in world["folders"])]
    if not 1 <= len(files) <= 4 or not names:
        return None
    target = rnd.choice(names)
    moves = [("files", "move", {"file_id": f["id"], "folder": target}) for f in files]
    return Spec(
        "archive_folder", {"source": source, "target": target},
        f"Create a folder '{target}' and move every file from the folder '{source}' into it.",
        apps=("files",),
        calls=(("files", "list", {"folder": source}), ("files", "create_folder", {"name": target}),
               *moves),
    )  # fmt: skip


def total_with_group(world: World, rnd: random.Random) -> Spec | None:
    group, direction = rnd.choice(GROUPS), rnd.choice(("in", "out"))
    days = rnd.choice((5, 7, 10, 14, 21, 30))
    emails = {c["email"] for c in members(world, group)}
    found = [p for p in payments(world, direction, day(-days)) if p["with"] in emails]
    if not found:
        return None
    total = round(sum(p["amount"] for p in found), 2)
    who = f"did the contacts in my '{group}' group pay me" if direction == "in" else (
        f"did I pay the contacts in my '{group}' group")
    return Spec(
        "total_with_group", {"group": group, "dir": direction, "days": days},
        f"How much {who} in total in the last {days} days (since {day(-days)})? "
        "Answer with just the amount.", apps=("contacts", "payments"),
        calls=(("contacts", "search", {"group": group}),
               ("payments", "list", {"since": day(-days), "dir": direction})),
        answer=f"{total:.2f}", check_answer=number_answer(total),
    )  # fmt: skip


def share_event(world: World, rnd: random.Random) -> Spec | None:
    upcoming = [e for e in world["events"] if e["date"] >= day(0)]
    if not upcoming:
        return None
    event, contact = rnd.choice(upcoming), rnd.choice(world["contacts"])
    title, when = event["title"], [event["date"], event["time"]]
    body = f"{title} is on {when[0]} at {when[1]}."
    return Spec(
        "share_event", {"title": title, "name": contact["name"]},
        f"Email {contact['name']} the date and time of my event '{title}', with the event's "
        "title as the subject.", apps=("calendar", "contacts", "email"),
        calls=(("calendar", "list", {}), search(contact),
               ("email", "send", {"to": contact["email"], "subject": title, "body": body})),
        loose={"emails": {"body": contains_all(when)}},
    )  # fmt: skip
