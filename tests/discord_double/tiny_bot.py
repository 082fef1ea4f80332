"""A throwaway discord.py bot for test_double.py: one small command per feature of the Discord double."""

from __future__ import annotations

import asyncio
import hashlib
from io import BytesIO
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands
from PIL import Image

__all__ = ["TinyBot", "png_bytes"]


def png_bytes(width: int = 8, height: int = 6) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


class AgainView(discord.ui.View):
    @discord.ui.button(label="Again", custom_id="echo:again", style=discord.ButtonStyle.primary)
    async def again(self, interaction: discord.Interaction, button: discord.ui.Button[AgainView]) -> None:
        await interaction.response.edit_message(content="clicked", view=None)

    @discord.ui.button(label="Later", custom_id="echo:later")
    async def later(self, interaction: discord.Interaction, button: discord.ui.Button[AgainView]) -> None:
        await interaction.response.defer()
        await interaction.edit_original_response(content="later")


class AskModal(discord.ui.Modal, title="Ask the oracle"):
    question: discord.ui.TextInput[AskModal] = discord.ui.TextInput(label="Question", custom_id="question")

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"asked: {self.question.value}", ephemeral=True)


class OneRowView(discord.ui.View):
    """Renders all its buttons into one action row, however many there are."""

    def to_components(self) -> list[dict[str, Any]]:
        return [{"type": 1, "components": [item.to_component_dict() for item in self.children]}]


class TinyBot(commands.Bot):
    """A bot with one command per double feature; `errors` collects Discord error codes it got."""

    def __init__(self) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            guild_ready_timeout=0.05,
        )
        self.errors: list[int] = []
        self.resumed = asyncio.Event()
        self.read_digests: list[str] = []
        self._add_commands()
        self._add_error_commands()

    async def setup_hook(self) -> None:
        await self.tree.sync()

    async def on_resumed(self) -> None:
        self.resumed.set()

    def _add_commands(self) -> None:
        tree = self.tree

        @tree.command(description="Echo text back with a picture and a button")
        async def echo(
            interaction: discord.Interaction, text: str, image: discord.Attachment | None = None
        ) -> None:
            await interaction.response.defer(thinking=True)
            file = discord.File(BytesIO(png_bytes()), filename="echo.png")
            await interaction.followup.send(text, file=file, view=AgainView())

        @tree.command(description="Pick a style")
        @app_commands.choices(name=[app_commands.Choice(name=n.title(), value=n) for n in ("anime", "photo")])
        async def style(interaction: discord.Interaction, name: app_commands.Choice[str]) -> None:
            await interaction.response.send_message(f"style {name.value}")

        @tree.command(description="Ask a question in a modal")
        async def ask(interaction: discord.Interaction) -> None:
            await interaction.response.send_modal(AskModal(custom_id="ask-modal"))

        async def models(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
            names = [f"model-{i}" for i in range(40)]
            return [app_commands.Choice(name=n, value=n) for n in names if current in n][:25]

        @tree.command(description="Choose a model")
        @app_commands.autocomplete(model=models)
        async def pick(interaction: discord.Interaction, model: str) -> None:
            await interaction.response.send_message(f"picked {model}")

    def _add_error_commands(self) -> None:
        tree = self.tree

        @tree.command(description="Answer too late")
        async def slow(interaction: discord.Interaction) -> None:
            await asyncio.sleep(3.2)
            try:
                await interaction.response.send_message("finally")
            except discord.HTTPException as exc:
                self.errors.append(exc.code)

        @tree.command(description="Break a Discord rule")
        @app_commands.choices(kind=[app_commands.Choice(name=n, value=n) for n in ("long", "row", "custom")])
        async def bad(interaction: discord.Interaction, kind: app_commands.Choice[str]) -> None:
            view = discord.ui.View()
            if kind.value == "row":
                view = OneRowView()  # discord.py itself refuses a sixth button in a row
                for i in range(6):
                    view.add_item(discord.ui.Button(label=f"b{i}", custom_id=f"b{i}"))
            elif kind.value == "custom":
                view.add_item(discord.ui.Button(label="x", custom_id="x" * 101))
            try:
                await interaction.response.send_message(
                    "y" * 2001 if kind.value == "long" else "ok", view=view
                )
            except discord.HTTPException as exc:
                self.errors.append(exc.code)

        @tree.command(description="Reply, edit it, follow up, edit that, delete the reply")
        async def steps(interaction: discord.Interaction) -> None:
            await interaction.response.send_message("one")
            await interaction.edit_original_response(content="two")
            original = await interaction.original_response()
            extra = await interaction.followup.send(
                f"three after {original.content}", ephemeral=True, wait=True
            )
            await extra.edit(content="four")
            await interaction.delete_original_response()

        cfg = app_commands.Group(name="cfg", description="Settings")

        @cfg.command(name="set", description="Set a key for a member")
        async def cfg_set(interaction: discord.Interaction, key: str, who: discord.Member) -> None:
            await interaction.response.send_message(f"{key} for {who.name} ({who.id})")

        tree.add_command(cfg)

        @tree.command(description="Read an image")
        async def digest(interaction: discord.Interaction, image: discord.Attachment) -> None:
            data = await image.read()
            self.read_digests.append(hashlib.sha256(data).hexdigest())
            await interaction.response.send_message(
                f"{image.filename} {image.width}x{image.height} {len(data)}"
            )
