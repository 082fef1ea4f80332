"""``/lora``, ``/embedding``, ``/hypernet``, ``/vae``: upload, import, list, info, share, rename, delete.

One group per kind, built from one class. Uploads are checked by the adapter validation before anything
is stored; the answer says what was detected ("LoRA, kohya format, SD 1.5, rank 16"), the custom model a
file was made for, and whether it fits the server's default model. Errors reach the user through the tree's
handler (:func:`cogs.common.install_error_handler`) only, so each gets one answer.
"""

from __future__ import annotations

import errno
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from cogs.common import answer
from models.adapters.targets import adapter_fits, model_of
from models.families import Family, family_info
from pipelines.asset_uploads import AddedAsset, add_asset_file, name_from_filename, remove_asset_file
from storage.assets import (
    check_asset_name,
    check_name_free,
    list_usable_assets,
    owned_bytes,
    rename_asset,
    set_visibility,
    usable_names,
)
from storage.errors import InvalidRequestError, NotFoundError, echo
from storage.files import STORAGE_FULL, StorageFullError
from storage.tables import AssetKind, Visibility

if TYPE_CHECKING:
    from pipelines.engine import Engine

__all__ = ["KIND_COMMANDS", "AssetGroup", "Assets", "added_text", "family_text", "how_to_use"]

log = logging.getLogger(__name__)

#: command name -> asset kind
KIND_COMMANDS = {
    "lora": AssetKind.LORA,
    "embedding": AssetKind.EMBEDDING,
    "hypernet": AssetKind.HYPERNETWORK,
    "vae": AssetKind.VAE,
}
SHARE_CHOICES = [
    app_commands.Choice(name="only me", value="private"),
    app_commands.Choice(name="this server", value="guild"),
]


def _mb(n_bytes: int) -> str:
    """Megabytes for a sentence: ``2048``, ``1.2`` (one decimal below 10 MB, none when it is ``.0``)."""
    megabytes = n_bytes / 2**20
    return f"{megabytes:.0f}" if megabytes >= 10 else f"{megabytes:.1f}".removesuffix(".0")


def how_to_use(kind: AssetKind, name: str) -> str:
    """The prompt syntax (or option) that uses an asset."""
    return {
        AssetKind.LORA: f"<lora:{name}:0.8>",
        AssetKind.EMBEDDING: name,
        AssetKind.HYPERNETWORK: f"<hypernet:{name}:1>",
        AssetKind.VAE: f"vae:{name}",
    }.get(kind, name)


def family_text(family: str, details: Mapping[str, Any] | None) -> str:
    """``SD 1.5``, or ``SD 1.5, shapes model`` for a file made for a custom model."""
    try:
        label = family_info(Family(family)).label
    except ValueError:  # a family no longer served
        label = family
    model = model_of(details)
    return f"{label}, {model} model" if model else label


def added_text(engine: Engine, verb: str, added: AddedAsset, command: str) -> str:
    """The answer to an upload or import: what was detected, where it fits, how to use it."""
    info = added.checked.info
    model = model_of(info.details)
    text = f"{verb} {added.summary()}" + (f", made for the {model} model." if model else ".")
    default = engine.served_targets()[0]  # the default model's
    if info.family != default.family or not adapter_fits(added.kind, info.details, default):
        made_for = f"the {model} model" if model else f"{family_info(info.family).label} models"
        text += (
            f" It is for {made_for} and does not fit this server's default model ({default.label}); "
            "pick a model it fits with `model:` when you use it."
        )
    return (
        text + f" Use it with `{how_to_use(added.kind, added.name)}` — it is private until you "
        f"`/{command} share` it."
    )


class AssetGroup(app_commands.Group):
    """The commands of one asset kind."""

    def __init__(self, engine: Engine, name: str, kind: AssetKind) -> None:
        super().__init__(name=name, description=f"Your {kind.label}s: upload, list, share, rename, delete.")
        self.engine = engine
        self.kind = kind

    async def names(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        """Autocomplete: the names this user may use here."""
        async with self.engine.db.sessions() as session:
            rows = await list_usable_assets(
                session, user_id=interaction.user.id, guild_id=interaction.guild_id, kind=self.kind
            )
        names = [n for n in usable_names(rows) if current.lower() in n.lower()]
        return [app_commands.Choice(name=n, value=n) for n in names[:25]]

    async def own_names(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        """Autocomplete for share, rename and delete: only the user's own files."""
        async with self.engine.db.sessions() as session:
            rows = await list_usable_assets(
                session, user_id=interaction.user.id, guild_id=interaction.guild_id, kind=self.kind
            )
        own = [r.name for r in rows if r.owner_id == interaction.user.id]
        names = [n for n in own if current.lower() in n.lower()]
        return [app_commands.Choice(name=n, value=n) for n in names[:25]]

    async def _may_upload(self, interaction: discord.Interaction, size: int = 0) -> int:
        """Refuse what the server's rules, the kind's size cap or the user's storage quota forbid (``size``:
        the file's, as Discord states it); returns the bytes left."""
        from cogs.admin import guild_policy

        policy = await guild_policy(self.engine, interaction.guild_id, interaction.channel_id)
        if policy.uploads == "admins" and not interaction.permissions.manage_guild:
            raise InvalidRequestError("On this server only members with Manage Server can add files.")
        cap = self.engine.asset_caps.get(self.kind, 1024 * 2**20)
        if size > cap:
            raise InvalidRequestError(
                f"That file is {_mb(size)} MB; {self.kind.label}s may be at most {_mb(cap)} MB."
            )
        quota = self.engine.settings.user_storage_mb * 2**20
        if size > quota:  # deleting files would not help
            raise InvalidRequestError(
                f"That file is {_mb(size)} MB, larger than all of your {_mb(quota)} MB of storage; "
                "upload a smaller file."
            )
        async with self.engine.db.sessions() as session:
            used = await owned_bytes(session, interaction.user.id)
        if used + size > quota:
            raise InvalidRequestError(
                f"Your files already take {_mb(used)} MB of your {_mb(quota)} MB; "
                f"delete some (`/{self.name} delete`) to make room."
            )
        return quota - used

    @app_commands.command(name="upload")
    async def upload(
        self, interaction: discord.Interaction, file: discord.Attachment, name: str | None = None
    ) -> None:
        """Add a file (.safetensors preferred; .pt/.bin/.ckpt are read without running code).

        Args:
            file: The file.
            name: The name to use in prompts (default: the file's name).
        """
        # What the attachment's size and the name alone tell is refused before anything is downloaded.
        await self._may_upload(interaction, file.size)
        name = check_asset_name(name or name_from_filename(file.filename))
        async with self.engine.db.sessions() as session:
            await check_name_free(session, owner_id=interaction.user.id, kind=self.kind, name=name)
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            data = await file.read()
        except discord.HTTPException:
            raise InvalidRequestError("Could not download the file; attach it again.") from None
        with tempfile.TemporaryDirectory(prefix="dreamcord-upload-") as scratch:
            path = Path(scratch) / "upload"  # the user's file name never reaches the disk
            try:
                path.write_bytes(data)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StorageFullError(STORAGE_FULL) from None
                raise
            del data
            added = await add_asset_file(
                self.engine,
                path,
                name=name,
                owner_id=interaction.user.id,
                guild_id=interaction.guild_id,
                kind=self.kind,
            )
        await interaction.followup.send(added_text(self.engine, "Added", added, self.name), ephemeral=True)

    @app_commands.command(name="import")
    async def import_(self, interaction: discord.Interaction, url: str, name: str | None = None) -> None:
        """Fetch a file from an allowed site (Hugging Face, Civitai, ...) by its https link.

        Args:
            url: The https download link.
            name: The name to use in prompts (default: the file's name).
        """
        from pipelines.url_import import DEFAULT_ALLOWED_HOSTS, check_url, fetch_to_file, import_headers

        room = await self._may_upload(interaction)
        settings = self.engine.settings
        hosts = settings.import_hosts if settings.import_hosts is not None else DEFAULT_ALLOWED_HOSTS
        check_url(url, hosts)  # a bad link is refused before anything is acknowledged or fetched
        await interaction.response.defer(ephemeral=True, thinking=True)
        imports = settings.data_dir / "imports"
        imports.mkdir(parents=True, exist_ok=True)
        fetched = await fetch_to_file(
            url,
            imports,
            allowed_hosts=hosts,
            max_bytes=min(self.engine.asset_caps.get(self.kind, 1024 * 2**20), room),
            timeout_s=settings.import_timeout_s,
            headers=import_headers(url, settings.import_tokens),
        )
        try:
            added = await add_asset_file(
                self.engine,
                fetched.path,
                name=name or name_from_filename(fetched.filename or "import"),
                owner_id=interaction.user.id,
                guild_id=interaction.guild_id,
                kind=self.kind,
            )
        finally:
            fetched.path.unlink(missing_ok=True)
        await interaction.followup.send(added_text(self.engine, "Imported", added, self.name), ephemeral=True)

    @app_commands.command(name="list")
    async def list_(self, interaction: discord.Interaction) -> None:
        """The ones you can use here: yours, this server's shared ones, public ones."""
        async with self.engine.db.sessions() as session:
            rows = await list_usable_assets(
                session, user_id=interaction.user.id, guild_id=interaction.guild_id, kind=self.kind
            )
        if not rows:
            await answer(
                interaction,
                f"There are no {self.kind.label}s you can use here yet; `/{self.name} upload` one.",
            )
            return
        lines = [
            f"`{row.name}` — {family_text(row.family, row.details)}, {row.format}"
            + ("" if row.owner_id == interaction.user.id else " (shared)")
            + ("" if row.visibility != Visibility.PRIVATE else " · private")
            for row in rows[:40]
        ]
        await answer(interaction, "\n".join(lines)[:2000])

    @app_commands.command(name="info")
    async def info(self, interaction: discord.Interaction, name: str) -> None:
        """What a file is and how to use it.

        Args:
            name: Its name.
        """
        async with self.engine.db.sessions() as session:
            rows = await list_usable_assets(
                session, user_id=interaction.user.id, guild_id=interaction.guild_id, kind=self.kind
            )
        row = next((r for r in rows if r.name.lower() == name.strip().lower()), None)
        if row is None:
            raise NotFoundError(
                f"There is no {self.kind.label} called {echo(name.strip())} that you can use here."
            )
        await answer(
            interaction,
            f"`{row.name}`: {self.kind.with_article}, {row.format} format, "
            f"{family_text(row.family, row.details)}, "
            f"{row.size / 2**20:.1f} MB, hash {row.short_hash}, {row.visibility.value}. "
            f"Use it with `{how_to_use(self.kind, row.name)}`.",
        )

    @app_commands.command(name="share")
    @app_commands.choices(with_=SHARE_CHOICES)
    @app_commands.rename(with_="with")
    async def share(self, interaction: discord.Interaction, name: str, with_: str = "guild") -> None:
        """Share one of yours with this server, or make it private again.

        Args:
            name: Its name.
            with_: Who may use it.
        """
        if with_ == Visibility.GUILD.value and interaction.guild_id is None:
            raise InvalidRequestError(
                "Share it from a channel of the server you want to share it with; a DM has no server."
            )
        async with self.engine.db.sessions.begin() as session:
            row = await set_visibility(
                session,
                owner_id=interaction.user.id,
                kind=self.kind,
                name=name,
                visibility=Visibility(with_),
                guild_id=interaction.guild_id,
            )
            label = row.name
        await answer(
            interaction, f"`{label}` is now {'shared with this server' if with_ == 'guild' else 'private'}."
        )

    @app_commands.command(name="rename")
    async def rename(self, interaction: discord.Interaction, name: str, new_name: str) -> None:
        """Rename one of yours.

        Args:
            name: Its name now.
            new_name: The new name.
        """
        async with self.engine.db.sessions.begin() as session:
            row = await rename_asset(
                session, owner_id=interaction.user.id, kind=self.kind, name=name, new_name=new_name
            )
            label = row.name
        await answer(interaction, f"Renamed to `{label}`; use `{how_to_use(self.kind, label)}`.")

    @app_commands.command(name="delete")
    async def delete(self, interaction: discord.Interaction, name: str) -> None:
        """Delete one of yours (jobs already made keep their images).

        Args:
            name: Its name.
        """
        await remove_asset_file(self.engine, owner_id=interaction.user.id, kind=self.kind, name=name)
        await answer(interaction, f"Deleted your {self.kind.label} `{name.strip()}`.")


AssetGroup.info.autocomplete("name")(AssetGroup.names)
for _command in (AssetGroup.share, AssetGroup.rename, AssetGroup.delete):
    _command.autocomplete("name")(AssetGroup.own_names)


class Assets(commands.Cog):
    """Holds the four asset groups."""

    def __init__(self, bot: commands.Bot, engine: Engine) -> None:
        self.bot = bot
        self.engine = engine
        self.groups = [AssetGroup(engine, name, kind) for name, kind in KIND_COMMANDS.items()]

    async def cog_load(self) -> None:
        for group in self.groups:
            self.bot.tree.add_command(group)

    async def cog_unload(self) -> None:
        for group in self.groups:
            self.bot.tree.remove_command(group.name)
