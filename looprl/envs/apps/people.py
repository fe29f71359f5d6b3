"""The APIs of the apps that deal with other people: contacts, email, payments.

Each function gets the world and arguments already checked against its signature
(`apis.call`) and returns JSON-able data. It raises `ApiError` before changing anything
when the call cannot be done, so a failed call leaves the world as it was.
"""

from __future__ import annotations

from typing import Any

from looprl.envs.apps.apis import ApiError, api, contains, delete_record, get_record, update_record
from looprl.envs.apps.world import GROUPS, add, day

World = dict[str, Any]
Args = dict[str, Any]
GROUP = "|".join(GROUPS)
EMAIL_SUMMARY = ("id", "from", "to", "subject", "date")


# --- contacts --------------------------------------------------------------------------


@api(
    "contacts", "search",
    f"query?: query, group?: {GROUP}",
    "contacts whose name/email/phone contain query, optionally in one group",
)
def contacts_search(world: World, args: Args) -> list[dict[str, Any]]:
    query = args.get("query", "")
    return [
        c
        for c in world["contacts"]
        if any(contains(c[k], query) for k in ("name", "email", "phone"))
        and args.get("group", c["group"]) == c["group"]
    ]


@api("contacts", "get", "contact_id: int", "one contact")
def contacts_get(world: World, args: Args) -> dict[str, Any]:
    return get_record(world, "contacts", args, "contact_id")


@api(
    "contacts", "add",
    f"name: str, email: email, phone: str, group?: {GROUP}",
    "add a contact; returns its id",
    writes=True,
)
def contacts_add(world: World, args: Args) -> dict[str, Any]:
    _check_email_is_new(world, args)
    fields = {k: args.get(k) for k in ("name", "email", "phone", "group")}
    return {"id": add(world, "contacts", **fields)["id"]}


@api(
    "contacts", "update",
    f"contact_id: int, name?: str, email?: email, phone?: str, group?: {GROUP}",
    "change fields of a contact",
    writes=True,
)
def contacts_update(world: World, args: Args) -> dict[str, Any]:
    record = get_record(world, "contacts", args, "contact_id")
    if args.get("email", record["email"]) != record["email"]:
        _check_email_is_new(world, args)
    return update_record(record, args, ("name", "email", "phone", "group"))


def _check_email_is_new(world: World, args: Args) -> None:
    # Emails identify contacts for email.send and payments.send, so they stay unique.
    if any(c["email"] == args["email"] for c in world["contacts"]):
        raise ApiError(f"a contact with email {args['email']} already exists")


@api("contacts", "delete", "contact_id: int", "delete a contact", writes=True)
def contacts_delete(world: World, args: Args) -> dict[str, Any]:
    return delete_record(world, "contacts", args, "contact_id")


# --- email -----------------------------------------------------------------------------


@api(
    "email", "list",
    "folder?: inbox|sent, sender?: query",
    "emails in a folder (default inbox), newest first, without bodies; sender: part of "
    "the from address",
)
def email_list(world: World, args: Args) -> list[dict[str, Any]]:
    folder, sender = args.get("folder", "inbox"), args.get("sender", "")
    emails = [
        {k: e[k] for k in EMAIL_SUMMARY}
        for e in world["emails"]
        if e["folder"] == folder and contains(e["from"], sender)
    ]
    return sorted(emails, key=lambda e: (e["date"], e["id"]), reverse=True)


@api("email", "read", "email_id: int", "one email with its body")
def email_read(world: World, args: Args) -> dict[str, Any]:
    return get_record(world, "emails", args, "email_id")


@api(
    "email", "send",
    "to: email, subject: str, body: text",
    "send an email; returns its id",
    writes=True,
)
def email_send(world: World, args: Args) -> dict[str, Any]:
    fields = {"folder": "sent", "from": world["user"]["email"], "to": args["to"]}
    fields.update(subject=args["subject"], body=args["body"], date=day(0))
    return {"id": add(world, "emails", **fields)["id"]}


@api("email", "delete", "email_id: int", "delete an email", writes=True)
def email_delete(world: World, args: Args) -> dict[str, Any]:
    return delete_record(world, "emails", args, "email_id")


# --- payments --------------------------------------------------------------------------


@api("payments", "balance", "", "your balance")
def payments_balance(world: World, args: Args) -> dict[str, Any]:
    return {"balance": world["balance"]}


@api(
    "payments", "list",
    "since?: date, dir?: in|out, with?: query",
    "payments, newest first; since: on or after that date; dir: in = received, out = "
    "sent; with: part of the other party's email",
)
def payments_list(world: World, args: Args) -> list[dict[str, Any]]:
    since, other = args.get("since", ""), args.get("with", "")
    payments = [
        p
        for p in world["payments"]
        if p["date"] >= since
        and args.get("dir", p["dir"]) == p["dir"]
        and contains(p["with"], other)
    ]
    return sorted(payments, key=lambda p: (p["date"], p["id"]), reverse=True)


@api(
    "payments", "send",
    "to: email, amount: amount, note?: query",
    "pay a contact (to: their email); returns the payment id and new balance",
    writes=True,
)
def payments_send(world: World, args: Args) -> dict[str, Any]:
    if not any(c["email"] == args["to"] for c in world["contacts"]):
        raise ApiError(f"no contact has the email {args['to']}")
    if args["amount"] > world["balance"]:
        raise ApiError(f"insufficient balance: {world['balance']} < {args['amount']}")
    world["balance"] = round(world["balance"] - args["amount"], 2)
    fields = {"dir": "out", "with": args["to"], "amount": round(float(args["amount"]), 2)}
    payment = add(world, "payments", **fields, note=args.get("note", ""), date=day(0))
    return {"id": payment["id"], "balance": world["balance"]}
