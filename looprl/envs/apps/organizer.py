"""The APIs of the organizer apps: calendar, notes, files.

Each function gets the world and arguments already checked against its signature
(`apis.call`) and returns JSON-able data. It raises `ApiError` before changing anything
when the call cannot be done, so a failed call leaves the world as it was.
"""

from __future__ import annotations

from typing import Any

from looprl.envs.apps.apis import ApiError, api, delete_record, get_record, show, update_record
from looprl.envs.apps.world import add

World = dict[str, Any]
Args = dict[str, Any]


# --- calendar --------------------------------------------------------------------------


@api("calendar", "list", "date?: date", "events, all or on one date, by date and time")
def calendar_list(world: World, args: Args) -> list[dict[str, Any]]:
    events = [e for e in world["events"] if args.get("date", e["date"]) == e["date"]]
    return sorted(events, key=lambda e: (e["date"], e["time"], e["id"]))


def _check_mins(args: Args) -> None:
    if not 5 <= args.get("mins", 60) <= 1440:
        raise ApiError(f"arg 'mins' must be between 5 and 1440, got {show(args['mins'])}")


@api(
    "calendar", "add",
    "title: str, date: date, time: time, mins?: int",
    "add an event (mins: duration, default 60); returns its id",
    writes=True,
)
def calendar_add(world: World, args: Args) -> dict[str, Any]:
    _check_mins(args)
    fields = {"title": args["title"], "date": args["date"], "time": args["time"]}
    return {"id": add(world, "events", **fields, mins=args.get("mins", 60))["id"]}


@api(
    "calendar", "update",
    "event_id: int, title?: str, date?: date, time?: time, mins?: int",
    "change fields of an event",
    writes=True,
)
def calendar_update(world: World, args: Args) -> dict[str, Any]:
    record = get_record(world, "events", args, "event_id")
    _check_mins(args)
    return update_record(record, args, ("title", "date", "time", "mins"))


@api("calendar", "delete", "event_id: int", "delete an event", writes=True)
def calendar_delete(world: World, args: Args) -> dict[str, Any]:
    return delete_record(world, "events", args, "event_id")


# --- notes -----------------------------------------------------------------------------


@api("notes", "list", "", "note ids and titles")
def notes_list(world: World, args: Args) -> list[dict[str, Any]]:
    return [{"id": n["id"], "title": n["title"]} for n in world["notes"]]


@api("notes", "read", "note_id: int", "one note with its body")
def notes_read(world: World, args: Args) -> dict[str, Any]:
    return get_record(world, "notes", args, "note_id")


@api("notes", "create", "title: str, body: text", "create a note; returns its id", writes=True)
def notes_create(world: World, args: Args) -> dict[str, Any]:
    return {"id": add(world, "notes", title=args["title"], body=args["body"])["id"]}


@api(
    "notes", "update",
    "note_id: int, title?: str, body?: text",
    "change the title or body (replaced) of a note",
    writes=True,
)
def notes_update(world: World, args: Args) -> dict[str, Any]:
    return update_record(get_record(world, "notes", args, "note_id"), args, ("title", "body"))


@api("notes", "delete", "note_id: int", "delete a note", writes=True)
def notes_delete(world: World, args: Args) -> dict[str, Any]:
    return delete_record(world, "notes", args, "note_id")


# --- files -----------------------------------------------------------------------------


def _folder(world: World, name: str) -> str:
    if not any(f["name"] == name for f in world["folders"]):
        known = ", ".join(f["name"] for f in world["folders"])
        raise ApiError(f"folder {name!r} not found; folders: {known}")
    return name


@api("files", "list", "folder?: str", "files, all or in one folder")
def files_list(world: World, args: Args) -> list[dict[str, Any]]:
    folder = _folder(world, args["folder"]) if "folder" in args else None
    return [f for f in world["files"] if folder in (None, f["folder"])]


@api("files", "folders", "", "folder names")
def files_folders(world: World, args: Args) -> list[str]:
    return [f["name"] for f in world["folders"]]


@api("files", "create_folder", "name: str", "create an empty folder", writes=True)
def files_create_folder(world: World, args: Args) -> dict[str, Any]:
    if any(f["name"] == args["name"] for f in world["folders"]):
        raise ApiError(f"folder {args['name']!r} already exists")
    return {"id": add(world, "folders", name=args["name"])["id"]}


@api(
    "files", "move",
    "file_id: int, folder: str",
    "move a file into an existing folder",
    writes=True,
)
def files_move(world: World, args: Args) -> dict[str, Any]:
    record = get_record(world, "files", args, "file_id")
    folder = _folder(world, args["folder"])
    if record["folder"] == folder:
        raise ApiError(f"file_id {record['id']} is already in {folder!r}")
    record["folder"] = folder
    return record


@api("files", "delete", "file_id: int", "delete a file", writes=True)
def files_delete(world: World, args: Args) -> dict[str, Any]:
    return delete_record(world, "files", args, "file_id")
