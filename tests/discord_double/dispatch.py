"""Build INTERACTION_CREATE payloads the way Discord does, from what a test person 'does' in the client.

A test can only do what Discord's client allows: a slash command must be registered (and visible to the user),
option values must fit their definitions, a button must exist and be enabled, a modal must have been shown.
Breaking that raises in the test (LookupError / ValueError / PermissionError) instead of reaching the bot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .models import Channel, Guild, Role, StoredFile, User

__all__ = ["command_data", "component_data", "modal_data"]

Resolved = dict[str, dict[str, Any]]


def _find_command(commands: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((c for c in commands if c.get("name") == name and c.get("type", 1) == 1), None)


def check_visible(command: dict[str, Any], guild: Guild, channel: Channel, user: User) -> None:
    """Discord hides commands the member lacks permissions for, and NSFW commands outside NSFW channels."""
    needed = command.get("default_member_permissions")
    if needed is not None and guild.permissions_of(user.id) & int(needed) != int(needed):
        raise PermissionError(f"/{command['name']} needs permissions {needed}; {user.name} cannot use it")
    if command.get("nsfw") and not channel.nsfw:
        raise PermissionError(f"/{command['name']} is NSFW and cannot be used in #{channel.name}")


def _walk(
    command: dict[str, Any], subcommand: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(subcommand/group definitions on the path, the option definitions at its end)."""
    defs = list(command.get("options") or [])
    path: list[dict[str, Any]] = []
    for part in (subcommand or "").split():
        found = next((o for o in defs if o.get("name") == part and o.get("type") in (1, 2)), None)
        if found is None:
            raise LookupError(f"/{command['name']} has no subcommand {part!r}")
        path.append(found)
        defs = list(found.get("options") or [])
    if any(o.get("type") in (1, 2) for o in defs):
        raise ValueError(f"/{command['name']} needs a subcommand (got {subcommand!r})")
    return path, defs


def _check_value(definition: dict[str, Any], value: Any) -> None:
    kind, name = definition["type"], definition["name"]
    types: dict[int, type | tuple[type, ...]] = {3: str, 4: int, 5: bool, 10: (int, float)}
    expected = types.get(kind)
    if expected and (not isinstance(value, expected) or (kind != 5 and isinstance(value, bool))):
        raise ValueError(f"option {name!r} (type {kind}) cannot take {value!r}")
    choices = definition.get("choices")
    if choices and value not in [c["value"] for c in choices]:
        raise ValueError(f"option {name!r} must be one of its choices, not {value!r}")
    if kind == 3:
        low, high = definition.get("min_length") or 0, definition.get("max_length") or 6000
        if not low <= len(value) <= high:
            raise ValueError(f"option {name!r}: length {len(value)} outside {low}..{high}")
    if kind in (4, 10):
        low, high = definition.get("min_value"), definition.get("max_value")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"option {name!r}: {value} outside {low}..{high}")


def _resolve(kind: int, value: Any, guild: Guild, resolved: Resolved, user: User) -> str:
    """Put a user/channel/role/attachment into `resolved`; its id as the option value."""
    if kind == 11:
        attachment = value.attachment() if isinstance(value, StoredFile) else dict(value)
        resolved.setdefault("attachments", {})[attachment["id"]] = attachment
        return str(attachment["id"])
    if isinstance(value, User) and kind in (6, 9):
        resolved.setdefault("users", {})[str(value.id)] = value.payload()
        if value.id in guild.members:
            member = guild.member_payload(value, with_permissions=True)
            member.pop("user")
            resolved.setdefault("members", {})[str(value.id)] = member
        return str(value.id)
    if isinstance(value, Role) and kind in (8, 9):
        resolved.setdefault("roles", {})[str(value.id)] = value.payload()
        return str(value.id)
    if isinstance(value, Channel) and kind == 7:
        channel = value.payload() | {"permissions": str(guild.permissions_of(user.id))}
        resolved.setdefault("channels", {})[str(value.id)] = channel
        return str(value.id)
    raise ValueError(f"option type {kind} cannot take {value!r}")


def command_data(
    commands: list[dict[str, Any]],
    name: str,
    guild: Guild,
    channel: Channel,
    user: User,
    *,
    options: Mapping[str, Any] | None = None,
    attachments: Mapping[str, Any] | None = None,
    subcommand: str | None = None,
    focused: str | None = None,
) -> dict[str, Any]:
    """The `data` of an APPLICATION_COMMAND (or, with `focused`, AUTOCOMPLETE) interaction."""
    command = _find_command(commands, name)
    if command is None:
        raise LookupError(f"/{name} is not registered (sync the command tree first)")
    check_visible(command, guild, channel, user)
    path, defs = _walk(command, subcommand)
    given = dict(options or {}) | dict(attachments or {})
    by_name = {d["name"]: d for d in defs}
    unknown = set(given) - set(by_name)
    if unknown:
        raise LookupError(f"/{name} has no option(s) {sorted(unknown)}")
    resolved: Resolved = {}
    built: list[dict[str, Any]] = []
    for definition in defs:
        key = definition["name"]
        if key not in given:
            if definition.get("required") and focused is None:
                raise ValueError(f"/{name}: required option {key!r} is missing")
            continue
        option: dict[str, Any] = {"name": key, "type": definition["type"]}
        value = given[key]
        if key == focused:
            if not definition.get("autocomplete"):
                raise ValueError(f"option {key!r} has no autocomplete")
            option |= {"value": str(value), "focused": True}
        elif definition["type"] in (6, 7, 8, 9, 11):
            option["value"] = _resolve(definition["type"], value, guild, resolved, user)
        else:
            _check_value(definition, value)
            option["value"] = value
        built.append(option)
    for wrapper in reversed(path):
        built = [{"name": wrapper["name"], "type": wrapper["type"], "options": built}]
    data: dict[str, Any] = {"id": command["id"], "name": name, "type": 1, "options": built}
    if resolved:
        data["resolved"] = resolved
    if "guild_id" in command:
        data["guild_id"] = command["guild_id"]
    return data


def component_data(component: dict[str, Any], values: list[str] | None) -> dict[str, Any]:
    """The `data` of a MESSAGE_COMPONENT interaction for this button or select."""
    if component.get("disabled"):
        raise ValueError(f"component {component.get('custom_id')!r} is disabled")
    data: dict[str, Any] = {"custom_id": component["custom_id"], "component_type": component["type"]}
    if component["type"] == 2:
        if values is not None:
            raise ValueError("a button takes no values")
        return data
    values = list(values or [])
    low, high = component.get("min_values", 1), component.get("max_values", 1)
    if not low <= len(values) <= high:
        raise ValueError(f"select {component['custom_id']!r} takes {low}..{high} values, got {len(values)}")
    if component["type"] == 3:
        allowed = {o["value"] for o in component.get("options") or []}
        if set(values) - allowed:
            raise ValueError(f"values {sorted(set(values) - allowed)} are not options of the select")
    data["values"] = values
    return data


def _input_value(item: dict[str, Any], values: Mapping[str, str]) -> dict[str, Any]:
    custom_id = item["custom_id"]
    value = values.get(custom_id, "")
    if item.get("required", True) and not value:
        raise ValueError(f"modal field {custom_id!r} is required")
    low, high = item.get("min_length") or 0, item.get("max_length") or 4000
    if value and not low <= len(value) <= high:
        raise ValueError(f"modal field {custom_id!r}: length {len(value)} outside {low}..{high}")
    return {"type": 4, "custom_id": custom_id, "value": value}


def modal_data(modal: dict[str, Any], values: Mapping[str, str]) -> dict[str, Any]:
    """The `data` of a MODAL_SUBMIT interaction, mirroring the modal's rows/labels with the typed values."""
    components: list[dict[str, Any]] = []
    known: set[str] = set()
    for row in modal.get("components") or []:
        if row.get("type") == 1:
            item = row["components"][0]
            known.add(item["custom_id"])
            components.append({"type": 1, "components": [_input_value(item, values)]})
        elif row.get("type") == 18 and (row.get("component") or {}).get("type") == 4:
            item = row["component"]
            known.add(item["custom_id"])
            components.append({"type": 18, "component": _input_value(item, values)})
    unknown = set(values) - known
    if unknown:
        raise LookupError(f"modal {modal.get('custom_id')!r} has no field(s) {sorted(unknown)}")
    return {"custom_id": modal["custom_id"], "components": components}
