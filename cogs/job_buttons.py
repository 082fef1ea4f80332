"""Persistent buttons on job messages: their custom_id holds only the action, the job id and an image index.

They are :class:`discord.ui.DynamicItem` s, registered once with the bot, so a button pressed after a
restart still works: the handler reads the job back from the database.
"""

from __future__ import annotations

import re
from typing import Any

import discord

__all__ = ["ACTIONS", "JobButton", "progress_view", "result_view"]

#: action -> (label, style); per-image actions get the image number appended.
ACTIONS: dict[str, tuple[str, discord.ButtonStyle]] = {
    "cancel": ("Cancel", discord.ButtonStyle.danger),
    "reroll": ("Reroll", discord.ButtonStyle.secondary),
    "remix": ("Remix", discord.ButtonStyle.primary),
    "delete": ("Delete", discord.ButtonStyle.danger),
    "info": ("Info", discord.ButtonStyle.secondary),
    "up": ("U", discord.ButtonStyle.secondary),
    "vs": ("V", discord.ButtonStyle.secondary),  # a subtle variation
    "vS": ("V+", discord.ButtonStyle.secondary),  # a strong variation
    "init": ("Init ", discord.ButtonStyle.secondary),  # use as init image (opens the remix form)
}

_TEMPLATE = r"dc:(?P<action>[a-zA-Z]+):(?P<job>[0-9]{1,19})(?::(?P<index>[0-9]))?"


class JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=_TEMPLATE):
    """One action on one job (and one of its images)."""

    def __init__(self, action: str, job_id: int, index: int | None = None, *, row: int | None = None) -> None:
        label, style = ACTIONS[action]
        if index is not None:
            label = f"{label}{index + 1}"
        custom_id = f"dc:{action}:{job_id}" + (f":{index}" if index is not None else "")
        super().__init__(discord.ui.Button(label=label, style=style, custom_id=custom_id, row=row))
        self.action = action
        self.job_id = job_id
        self.index = index

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> JobButton:
        index = match["index"]
        return cls(match["action"], int(match["job"]), int(index) if index is not None else None)

    async def callback(self, interaction: discord.Interaction) -> None:
        cog: Any = interaction.client.get_cog("Generate")  # type: ignore[attr-defined]
        await cog.on_button(interaction, self.action, self.job_id, self.index)


def progress_view(job_id: int) -> discord.ui.View:
    """While a job waits or runs: a Cancel button."""
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton("cancel", job_id))
    return view


def result_view(job_id: int, images: int, *, per_image: bool = True) -> discord.ui.View:
    """A finished job: per-image Upscale / Variations / Init rows, then Reroll, Remix, Info, Delete."""
    view = discord.ui.View(timeout=None)
    if per_image:
        for row, action in enumerate(("up", "vs", "vS", "init")):
            for index in range(images):
                view.add_item(JobButton(action, job_id, index, row=row))
    for action in ("reroll", "remix", "info", "delete"):
        view.add_item(JobButton(action, job_id, row=4))
    return view
