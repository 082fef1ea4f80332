"""Discord's rules for what a bot sends: each check returns a list of human-readable problems (empty = ok).

Limits come from `limits.limits()` (Discord's OpenAPI spec); structural rules that the spec cannot express
(row shapes, button style rules, option ordering, subcommand nesting) follow Discord's developer docs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import regex

from .limits import limits

__all__ = [
    "EPHEMERAL",
    "LOADING",
    "COMPONENTS_V2",
    "check_message",
    "check_components",
    "check_modal",
    "check_files",
    "check_autocomplete",
    "check_commands",
    "check_command",
]

EPHEMERAL = 1 << 6
LOADING = 1 << 7
SUPPRESS_EMBEDS = 1 << 2
SUPPRESS_NOTIFICATIONS = 1 << 12
COMPONENTS_V2 = 1 << 15
# Docs, "Interaction Response Object": only these flags may be set on an interaction message.
INTERACTION_FLAGS = EPHEMERAL | SUPPRESS_EMBEDS | SUPPRESS_NOTIFICATIONS | COMPONENTS_V2
# Docs, "Create Message": a channel message may only set these.
CHANNEL_FLAGS = SUPPRESS_EMBEDS | SUPPRESS_NOTIFICATIONS | COMPONENTS_V2

# Docs, "Application Command Naming" (see ../shared/fixtures/README.md).
NAME_RE = regex.compile(r"^[-_'\p{L}\p{N}\p{sc=Deva}\p{sc=Thai}]{1,32}$")
SELECT_TYPES = {3, 5, 6, 7, 8}
BUTTON_STYLES = {1, 2, 3, 4, 5, 6}


def _too_long(where: str, value: Any, limit: int, min_len: int = 0) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, str):
        return [f"{where} must be a string, got {type(value).__name__}"]
    if not min_len <= len(value) <= limit:
        return [f"{where} is {len(value)} characters (allowed {min_len}..{limit})"]
    return []


def check_message(payload: Mapping[str, Any], *, interaction: bool = True, edit: bool = False) -> list[str]:
    """Check a message create/edit payload (content, embeds, components, flags, attachments list)."""
    lim = limits()
    problems = _too_long("content", payload.get("content"), lim.content)
    flags = payload.get("flags") or 0
    allowed = INTERACTION_FLAGS if interaction else CHANNEL_FLAGS
    if not isinstance(flags, int) or flags & ~allowed:
        problems.append(f"flags {flags!r} set bits not allowed here (allowed mask {allowed})")
    elif edit and flags & EPHEMERAL:
        problems.append("flags: EPHEMERAL cannot be set when editing a message")
    embeds = payload.get("embeds") or []
    if len(embeds) > lim.embeds:
        problems.append(f"{len(embeds)} embeds (max {lim.embeds})")
    problems += check_embeds(embeds)
    attachments = payload.get("attachments") or []
    if len(attachments) > lim.attachments:
        problems.append(f"{len(attachments)} attachments (max {lim.attachments})")
    v2 = isinstance(flags, int) and bool(flags & COMPONENTS_V2)
    if v2 and (payload.get("content") or embeds):
        problems.append("a COMPONENTS_V2 message cannot have content or embeds")
    problems += check_components(payload.get("components") or [], v2=v2)
    return problems


def check_embeds(embeds: Iterable[Mapping[str, Any]]) -> list[str]:
    """Per-embed limits and the 6000-character total over all embeds of a message."""
    lim = limits()
    problems: list[str] = []
    total = 0
    for i, embed in enumerate(embeds):
        where = f"embeds[{i}]"
        footer = (embed.get("footer") or {}).get("text")
        author = (embed.get("author") or {}).get("name")
        problems += _too_long(f"{where}.title", embed.get("title"), lim.embed_title)
        problems += _too_long(f"{where}.description", embed.get("description"), lim.embed_description)
        problems += _too_long(f"{where}.footer.text", footer, lim.embed_footer)
        problems += _too_long(f"{where}.author.name", author, lim.embed_author)
        fields = embed.get("fields") or []
        if len(fields) > lim.embed_fields:
            problems.append(f"{where} has {len(fields)} fields (max {lim.embed_fields})")
        texts = [embed.get("title"), embed.get("description"), footer, author]
        for j, field in enumerate(fields):
            problems += _too_long(f"{where}.fields[{j}].name", field.get("name"), lim.embed_field_name, 1)
            problems += _too_long(f"{where}.fields[{j}].value", field.get("value"), lim.embed_field_value, 1)
            texts += [field.get("name"), field.get("value")]
        total += sum(len(t) for t in texts if isinstance(t, str))
    if total > lim.embed_total:
        problems.append(f"embeds hold {total} characters in all (max {lim.embed_total})")
    return problems


def check_components(components: list[Mapping[str, Any]], *, v2: bool = False) -> list[str]:
    """Action rows, buttons and selects of a message; custom_ids must be unique within the message."""
    lim = limits()
    problems: list[str] = []
    if not v2 and len(components) > lim.action_rows:
        problems.append(f"{len(components)} action rows (max {lim.action_rows})")
    if v2 and len(components) > lim.modal_components:
        problems.append(f"{len(components)} top-level components (max {lim.modal_components})")
    seen: set[str] = set()
    for i, row in enumerate(components):
        if row.get("type") != 1:
            if not v2:
                problems.append(f"components[{i}] is type {row.get('type')!r}; top level must be action rows")
            continue
        problems += _check_row(f"components[{i}]", row, seen)
    return problems


def _check_row(where: str, row: Mapping[str, Any], seen: set[str]) -> list[str]:
    lim = limits()
    items = row.get("components") or []
    if not items:
        return [f"{where} is an empty action row"]
    kinds = {item.get("type") for item in items}
    problems: list[str] = []
    if kinds & SELECT_TYPES and len(items) > 1:
        problems.append(f"{where} mixes a select menu with {len(items) - 1} other component(s)")
    elif len(items) > lim.row_items:
        problems.append(f"{where} has {len(items)} buttons (max {lim.row_items})")
    for j, item in enumerate(items):
        kind = item.get("type")
        if kind == 2:
            problems += _check_button(f"{where}.components[{j}]", item, seen)
        elif kind in SELECT_TYPES:
            problems += _check_select(f"{where}.components[{j}]", item, seen)
        else:
            problems.append(f"{where}.components[{j}] has type {kind!r}, not allowed in a message row")
    return problems


def _check_custom_id(where: str, custom_id: Any, seen: set[str]) -> list[str]:
    problems = _too_long(f"{where}.custom_id", custom_id, limits().custom_id, 1)
    if custom_id is None:
        return [f"{where} needs a custom_id"]
    if custom_id in seen:
        problems.append(f"{where}.custom_id {custom_id!r} is not unique in the message")
    seen.add(custom_id)
    return problems


def _check_button(where: str, button: Mapping[str, Any], seen: set[str]) -> list[str]:
    lim = limits()
    style = button.get("style")
    problems = _too_long(f"{where}.label", button.get("label"), lim.button_label)
    if style not in BUTTON_STYLES:
        return [*problems, f"{where} has invalid button style {style!r}"]
    if style == 5:
        if not button.get("url") or button.get("custom_id") is not None:
            problems.append(f"{where}: a link button needs a url and no custom_id")
        problems += _too_long(f"{where}.url", button.get("url"), lim.button_url)
    elif style == 6:
        if not button.get("sku_id") or any(button.get(k) for k in ("custom_id", "url", "label", "emoji")):
            problems.append(f"{where}: a premium button needs sku_id and no custom_id, url, label or emoji")
    else:
        if button.get("url") is not None:
            problems.append(f"{where}: a non-link button cannot have a url")
        problems += _check_custom_id(where, button.get("custom_id"), seen)
    if style != 6 and not button.get("label") and not button.get("emoji"):
        problems.append(f"{where}: a button needs a label or an emoji")
    return problems


def _check_select(where: str, select: Mapping[str, Any], seen: set[str]) -> list[str]:
    lim = limits()
    problems = _check_custom_id(where, select.get("custom_id"), seen)
    problems += _too_long(f"{where}.placeholder", select.get("placeholder"), lim.select_placeholder)
    low, high = select.get("min_values", 1), select.get("max_values", 1)
    if not (0 <= low <= lim.select_values and 1 <= high <= lim.select_values and low <= high):
        problems.append(f"{where}: min_values {low} / max_values {high} out of range")
    if select.get("type") != 3:
        return problems
    options = select.get("options") or []
    if not 1 <= len(options) <= lim.select_options:
        problems.append(f"{where} has {len(options)} options (allowed 1..{lim.select_options})")
    if high > len(options):
        problems.append(f"{where}: max_values {high} exceeds its {len(options)} options")
    for k, option in enumerate(options):
        for key in ("label", "value"):
            problems += _too_long(f"{where}.options[{k}].{key}", option.get(key), lim.select_option_text, 1)
        problems += _too_long(
            f"{where}.options[{k}].description", option.get("description"), lim.select_option_text
        )
    return problems


def check_modal(data: Mapping[str, Any]) -> list[str]:
    """A modal (callback type 9): title, custom_id, 1..5 rows (or labels) each holding one text input."""
    lim = limits()
    problems = _too_long("modal.title", data.get("title"), lim.modal_title, 1)
    problems += _too_long("modal.custom_id", data.get("custom_id"), lim.custom_id, 1)
    rows = data.get("components") or []
    # Docs, "Modal": between 1 and 5 components.
    if not 1 <= len(rows) <= 5:
        problems.append(f"modal has {len(rows)} components (allowed 1..5)")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"modal.components[{i}]"
        if row.get("type") == 1:
            inner = row.get("components") or []
            if len(inner) != 1 or inner[0].get("type") != 4:
                problems.append(f"{where}: a modal action row must hold exactly one text input")
                continue
            problems += _check_text_input(where + ".components[0]", inner[0], seen, needs_label=True)
        elif row.get("type") == 18:
            problems += _too_long(f"{where}.label", row.get("label"), lim.text_input_label, 1)
            inner_one = row.get("component") or {}
            if inner_one.get("type") == 4:
                problems += _check_text_input(where + ".component", inner_one, seen, needs_label=False)
            elif inner_one.get("type") in SELECT_TYPES:
                problems += _check_select(where + ".component", inner_one, seen)
            else:
                problems.append(f"{where}: a label must hold a text input or a select")
        elif row.get("type") != 10:
            problems.append(f"{where} has type {row.get('type')!r}, not allowed in a modal")
    return problems


def _check_text_input(where: str, item: Mapping[str, Any], seen: set[str], *, needs_label: bool) -> list[str]:
    lim = limits()
    problems = _check_custom_id(where, item.get("custom_id"), seen)
    if item.get("style") not in (1, 2):
        problems.append(f"{where} has invalid text input style {item.get('style')!r}")
    if needs_label and not item.get("label"):
        problems.append(f"{where} needs a label")
    problems += _too_long(f"{where}.label", item.get("label"), lim.text_input_label)
    problems += _too_long(f"{where}.value", item.get("value"), lim.text_input_value)
    problems += _too_long(f"{where}.placeholder", item.get("placeholder"), lim.text_input_placeholder)
    low, high = item.get("min_length"), item.get("max_length")
    top = lim.text_input_value
    if (low is not None and not 0 <= low <= top) or (high is not None and not 1 <= high <= top):
        problems.append(f"{where}: min_length {low} / max_length {high} out of range")
    elif low is not None and high is not None and low > high:
        problems.append(f"{where}: min_length {low} is above max_length {high}")
    return problems


def check_files(sizes: list[int], limit: int) -> list[str]:
    """At most 10 files and, as this project's rule, their total size within the guild's upload limit."""
    lim = limits()
    problems: list[str] = []
    if len(sizes) > lim.attachments:
        problems.append(f"{len(sizes)} files in one message (max {lim.attachments})")
    if sum(sizes) > limit:
        problems.append(f"files total {sum(sizes)} bytes, over the upload limit of {limit} bytes")
    return problems


def check_autocomplete(data: Mapping[str, Any]) -> list[str]:
    """An autocomplete result (callback type 8): at most 25 choices with valid names."""
    lim = limits()
    choices = data.get("choices")
    if not isinstance(choices, list):
        return ["autocomplete response needs a choices list"]
    problems = [f"{len(choices)} autocomplete choices (max {lim.autocomplete_choices})"]
    problems = problems if len(choices) > lim.autocomplete_choices else []
    for i, choice in enumerate(choices):
        problems += _too_long(f"choices[{i}].name", choice.get("name"), lim.choice_name, 1)
        if "value" not in choice:
            problems.append(f"choices[{i}] has no value")
    return problems


def check_commands(commands: list[Mapping[str, Any]], *, guild: bool) -> list[str]:
    """A bulk overwrite: every command valid, names unique per type, per-type count limits."""
    lim = limits()
    problems: list[str] = []
    names: set[tuple[int, str]] = set()
    counts: dict[int, int] = {}
    for i, command in enumerate(commands):
        kind = command.get("type", 1)
        key = (kind, command.get("name", ""))
        if key in names:
            problems.append(f"commands[{i}]: duplicate name {key[1]!r} for type {kind}")
        names.add(key)
        counts[kind] = counts.get(kind, 0) + 1
        problems += [f"commands[{i}] ({key[1]!r}): {p}" for p in check_command(command)]
    chat_max = lim.guild_chat_commands if guild else lim.global_chat_commands
    if counts.get(1, 0) > chat_max:
        problems.append(f"{counts[1]} chat input commands (max {chat_max})")
    for kind in (2, 3):
        if counts.get(kind, 0) > lim.global_context_commands:
            problems.append(f"{counts[kind]} commands of type {kind} (max {lim.global_context_commands})")
    return problems


def _check_name(where: str, name: Any) -> list[str]:
    if not isinstance(name, str) or not NAME_RE.match(name):
        return [f"{where} {name!r} does not match Discord's name pattern"]
    if name != name.lower():
        return [f"{where} {name!r} must be lower-case"]
    return []


def check_command(command: Mapping[str, Any]) -> list[str]:
    """One application command (ApplicationCommandCreateRequest plus the docs' naming and nesting rules)."""
    lim = limits()
    kind = command.get("type", 1)
    if kind not in (1, 2, 3, 4):
        return [f"invalid command type {kind!r}"]
    if kind != 1:
        problems = _too_long("name", command.get("name"), lim.command_name, 1)
        if command.get("description") or command.get("options"):
            problems.append("context menu commands take no description or options")
        return problems
    problems = _check_name("name", command.get("name"))
    problems += _too_long("description", command.get("description"), lim.command_description, 1)
    if command.get("description") is None:
        problems.append("description is required for chat input commands")
    problems += _check_options("options", command.get("options") or [], depth=0)
    return problems


def _check_options(where: str, options: list[Mapping[str, Any]], depth: int) -> list[str]:
    lim = limits()
    problems: list[str] = []
    if len(options) > lim.command_options:
        problems.append(f"{where} has {len(options)} options (max {lim.command_options})")
    kinds = [o.get("type") for o in options]
    nested = [k for k in kinds if k in (1, 2)]
    if nested and len(nested) != len(kinds):
        problems.append(f"{where} mixes subcommands/groups with plain options")
    if depth == 1 and 2 in kinds:
        problems.append(f"{where}: a subcommand group may only contain subcommands")
    if depth == 2 and nested:
        problems.append(f"{where}: subcommands cannot be nested in a subcommand")
    names: set[str] = set()
    optional_seen = False
    for i, option in enumerate(options):
        here = f"{where}[{i}]"
        if option.get("name") in names:
            problems.append(f"{here}: duplicate option name {option.get('name')!r}")
        names.add(option.get("name", ""))
        if option.get("type") not in (1, 2) and option.get("required"):
            if optional_seen:
                problems.append(f"{here}: required option {option.get('name')!r} after an optional one")
        elif option.get("type") not in (1, 2):
            optional_seen = True
        problems += _check_option(here, option, depth)
    return problems


def _check_option(where: str, option: Mapping[str, Any], depth: int) -> list[str]:
    lim = limits()
    kind = option.get("type")
    if not isinstance(kind, int) or kind not in range(1, 12):
        return [f"{where} has invalid option type {kind!r}"]
    problems = _check_name(f"{where}.name", option.get("name"))
    problems += _too_long(f"{where}.description", option.get("description"), lim.command_description, 1)
    if option.get("description") is None:
        problems.append(f"{where}.description is required")
    if kind in (1, 2):
        # Depth: command options are 0, a group's 1, a subcommand's 2 (a group's subcommand sits at 1).
        inner_depth = 1 if kind == 2 else 2
        if kind == 2 and depth != 0:
            problems.append(f"{where}: a subcommand group must be at the top level")
        problems += _check_options(f"{where}.options", option.get("options") or [], inner_depth)
        return problems
    if depth == 1:
        problems.append(f"{where}: a subcommand group may only contain subcommands")
    problems += _check_choices(where, option, kind)
    if kind != 3 and (option.get("min_length") is not None or option.get("max_length") is not None):
        problems.append(f"{where}: min_length/max_length are only for string options")
    if kind not in (4, 10) and (option.get("min_value") is not None or option.get("max_value") is not None):
        problems.append(f"{where}: min_value/max_value are only for integer and number options")
    if kind != 7 and option.get("channel_types"):
        problems.append(f"{where}: channel_types is only for channel options")
    return problems


def _check_choices(where: str, option: Mapping[str, Any], kind: int) -> list[str]:
    lim = limits()
    problems: list[str] = []
    choices = option.get("choices") or []
    if choices and kind not in (3, 4, 10):
        problems.append(f"{where}: choices are only for string, integer and number options")
    if choices and option.get("autocomplete"):
        problems.append(f"{where}: choices and autocomplete are mutually exclusive")
    if option.get("autocomplete") and kind not in (3, 4, 10):
        problems.append(f"{where}: autocomplete is only for string, integer and number options")
    if len(choices) > lim.option_choices:
        problems.append(f"{where} has {len(choices)} choices (max {lim.option_choices})")
    for j, choice in enumerate(choices):
        problems += _too_long(f"{where}.choices[{j}].name", choice.get("name"), lim.choice_name, 1)
        value = choice.get("value")
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        ok = isinstance(value, str) if kind == 3 else numeric and (kind != 4 or isinstance(value, int))
        if not ok:
            problems.append(f"{where}.choices[{j}].value {value!r} does not fit option type {kind}")
    return problems
