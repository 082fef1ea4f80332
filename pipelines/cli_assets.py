"""``dreamcord check-asset`` and ``dreamcord assets add|list|remove`` (admins' side of users' adapters)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from storage.errors import BotError
from storage.tables import AssetKind, Visibility

__all__ = ["add_asset_commands", "run_assets", "run_check_asset"]

_KINDS = ["lora", "embedding", "hypernetwork", "vae"]


def add_asset_commands(sub: Any, parser_class: Any, check_handler: Any, assets_handler: Any) -> None:
    p = sub.add_parser("check-asset", help="recognise an adapter file (reads it, never runs anything in it)")
    p.add_argument("path", type=Path)
    p.add_argument("--kind", choices=_KINDS, default=None, help="only consider this kind")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=check_handler)

    assets = sub.add_parser("assets", help="users' LoRAs, embeddings, hypernetworks and VAEs")
    assets_sub = assets.add_subparsers(dest="assets_command", required=True, parser_class=parser_class)
    p = assets_sub.add_parser("add", help="check a file and add it (public, owned by the server, by default)")
    p.add_argument("path", type=Path)
    p.add_argument("--name", default=None, help="what prompts call it (default: from the file name)")
    p.add_argument("--kind", choices=_KINDS, default=None)
    p.add_argument("--owner", type=int, default=None, help="a Discord user id (default: the server)")
    p.add_argument("--guild", type=int, default=None, help="the guild it belongs to")
    p.add_argument("--visibility", choices=[v.value for v in Visibility], default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=assets_handler)
    p = assets_sub.add_parser("list", help="list assets")
    p.add_argument("--kind", choices=_KINDS, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=assets_handler)
    p = assets_sub.add_parser("remove", help="delete an asset (and its file when nothing else uses it)")
    p.add_argument("name")
    p.add_argument("--kind", choices=_KINDS, required=True)
    p.add_argument("--owner", type=int, default=None, help="a Discord user id (default: the server)")
    p.set_defaults(func=assets_handler)


def run_check_asset(args: argparse.Namespace) -> int:
    """Exit 0 with ``{"ok": true, ...}`` for a recognised file, 1 with ``{"ok": false, "error"}`` if not."""
    from models.adapters.inspect import asset_caps, check_asset
    from models.adapters.targets import served_targets
    from pipelines.settings import build_registry, load_settings

    settings = load_settings()
    try:
        if not args.path.is_file():
            raise BotError(f"There is no file at {args.path}.")
        checked = check_asset(
            args.path,
            kind=AssetKind(args.kind) if args.kind else None,
            targets=served_targets(build_registry(settings)),
            caps=asset_caps(settings.asset_max_mb),
        )
    except BotError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}, ensure_ascii=False))
        else:
            print(f"Refused: {exc}")
        return 1
    if args.json:
        print(json.dumps(checked.to_json(), ensure_ascii=False))
    else:
        print(f"{checked.info.describe()} (sha256 {checked.sha256[:12]}, webui hash {checked.short_hash})")
    return 0


def run_assets(args: argparse.Namespace) -> int:
    return asyncio.run(_assets(args))


async def _assets(args: argparse.Namespace) -> int:
    from pipelines.asset_uploads import add_asset_file, name_from_filename, remove_asset_file
    from pipelines.engine import Engine
    from pipelines.settings import load_settings
    from storage.assets import SERVER_OWNER_ID, list_all_assets

    async with Engine(load_settings()) as engine:
        owner = getattr(args, "owner", None) or SERVER_OWNER_ID
        if args.assets_command == "add":
            if not args.path.is_file():
                raise BotError(f"There is no file at {args.path}.")
            visibility = args.visibility or (
                Visibility.PUBLIC if owner == SERVER_OWNER_ID else Visibility.PRIVATE
            )
            added = await add_asset_file(
                engine,
                args.path,
                name=args.name or name_from_filename(args.path.name),
                owner_id=owner,
                guild_id=args.guild,
                kind=AssetKind(args.kind) if args.kind else None,
                visibility=Visibility(visibility),
            )
            if args.json:
                print(json.dumps({"id": added.id, "name": added.name, **added.checked.to_json()}))
            else:
                print(f"Added {added.summary()} ({added.visibility})")
            return 0
        if args.assets_command == "remove":
            await remove_asset_file(engine, owner_id=owner, kind=AssetKind(args.kind), name=args.name)
            print(f"Removed {args.kind} {args.name}")
            return 0
        async with engine.db.sessions() as session:
            rows = await list_all_assets(session, kind=AssetKind(args.kind) if args.kind else None)
        listing = [
            {
                "kind": str(r.kind),
                "name": r.name,
                "owner": r.owner_id,
                "guild": r.guild_id,
                "visibility": str(r.visibility),
                "family": r.family,
                "format": r.format,
                "short_hash": r.short_hash,
                "size": r.size,
            }
            for r in rows
        ]
        if args.json:
            print(json.dumps(listing))
        else:
            for item in listing:
                print(
                    f"{item['kind']:<12} {item['name']:<24} {item['family']:<5} {item['format']:<18} "
                    f"{item['visibility']:<8} {item['short_hash']} owner {item['owner']}"
                )
        return 0
