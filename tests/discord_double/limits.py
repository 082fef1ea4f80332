"""Discord's numeric limits, read from ../shared/fixtures/discord/openapi.json where it states them.

Every limit has a fallback equal to the value in that spec (or, where the spec is silent, Discord's developer
docs, named in the comment), so the double still works if the spec file is missing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["Limits", "limits", "OPENAPI_PATH"]

log = logging.getLogger(__name__)

OPENAPI_PATH = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "discord" / "openapi.json"


@dataclass(frozen=True)
class Limits:
    """Numeric limits the rules check; field names say what they bound."""

    content: int = 2000
    embeds: int = 10
    attachments: int = 10
    embed_title: int = 256
    embed_description: int = 4096
    embed_fields: int = 25
    embed_field_name: int = 256
    embed_field_value: int = 1024
    embed_footer: int = 2048
    embed_author: int = 256
    custom_id: int = 100
    button_label: int = 80
    button_url: int = 512
    row_items: int = 5
    select_options: int = 25
    select_placeholder: int = 150
    select_option_text: int = 100
    select_values: int = 25
    modal_title: int = 45
    modal_components: int = 40
    text_input_label: int = 45
    text_input_value: int = 4000
    text_input_placeholder: int = 100
    command_name: int = 32
    command_description: int = 100
    command_options: int = 25
    option_choices: int = 25
    choice_name: int = 100
    string_option_length: int = 6000
    autocomplete_choices: int = 25
    # Not in the spec; from Discord's docs ("Embed Limits", "Action Rows", "Registering a Command").
    embed_total: int = 6000
    action_rows: int = 5
    global_chat_commands: int = 100
    global_context_commands: int = 15
    guild_chat_commands: int = 100


def _get(schemas: dict[str, Any], path: str, default: int) -> int:
    """Follow 'Schema.prop.prop.key' through schemas' properties; return default where it breaks."""
    name, *rest = path.split(".")
    node: Any = schemas.get(name)
    for part in rest[:-1]:
        node = node.get("properties", {}).get(part) if isinstance(node, dict) else None
    value = node.get(rest[-1]) if isinstance(node, dict) else None
    if not isinstance(value, int):
        log.warning("openapi.json has no %s; using %d", path, default)
        return default
    return value


_SPEC_PATHS: dict[str, str] = {
    "content": "IncomingWebhookInteractionRequest.content.maxLength",
    "embeds": "IncomingWebhookInteractionRequest.embeds.maxItems",
    "attachments": "IncomingWebhookInteractionRequest.attachments.maxItems",
    "embed_title": "RichEmbed.title.maxLength",
    "embed_description": "RichEmbed.description.maxLength",
    "embed_fields": "RichEmbed.fields.maxItems",
    "embed_field_name": "RichEmbedField.name.maxLength",
    "embed_field_value": "RichEmbedField.value.maxLength",
    "embed_footer": "RichEmbedFooter.text.maxLength",
    "embed_author": "RichEmbedAuthor.name.maxLength",
    "custom_id": "ButtonComponentForMessageRequest.custom_id.maxLength",
    "button_label": "ButtonComponentForMessageRequest.label.maxLength",
    "button_url": "ButtonComponentForMessageRequest.url.maxLength",
    "row_items": "ActionRowComponentForMessageRequest.components.maxItems",
    "select_options": "StringSelectComponentForMessageRequest.options.maxItems",
    "select_placeholder": "StringSelectComponentForMessageRequest.placeholder.maxLength",
    "select_option_text": "StringSelectOptionForRequest.label.maxLength",
    "select_values": "StringSelectComponentForMessageRequest.max_values.maximum",
    "modal_title": "ModalInteractionCallbackRequestData.title.maxLength",
    "modal_components": "ModalInteractionCallbackRequestData.components.maxItems",
    "text_input_label": "TextInputComponentForModalRequest.label.maxLength",
    "text_input_value": "TextInputComponentForModalRequest.value.maxLength",
    "text_input_placeholder": "TextInputComponentForModalRequest.placeholder.maxLength",
    "command_name": "ApplicationCommandCreateRequest.name.maxLength",
    "command_description": "ApplicationCommandStringOption.description.maxLength",
    "command_options": "ApplicationCommandCreateRequest.options.maxItems",
    "option_choices": "ApplicationCommandStringOption.choices.maxItems",
    "choice_name": "ApplicationCommandOptionStringChoice.name.maxLength",
    "string_option_length": "ApplicationCommandStringOption.max_length.maximum",
    "autocomplete_choices": "InteractionApplicationCommandAutocompleteCallbackStringData.choices.maxItems",
}


@lru_cache(maxsize=1)
def limits() -> Limits:
    """The limits, loaded once from openapi.json (defaults where the file or a key is missing)."""
    defaults = Limits()
    try:
        schemas = json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))["components"]["schemas"]
    except (OSError, ValueError, KeyError):
        log.warning("cannot read %s; using built-in Discord limits", OPENAPI_PATH)
        return defaults
    found = {field: _get(schemas, path, getattr(defaults, field)) for field, path in _SPEC_PATHS.items()}
    return Limits(**found)
