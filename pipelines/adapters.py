"""Which of the user's adapters a job uses: ``<lora:...>``/``<hypernet:...>`` tags, embedding words, the VAE.

Resolution happens before the job is stored, so a prompt naming a LoRA nobody shared with this user, one for
another family or made for another model (``details["model"]``, see :mod:`models.adapters.targets`), or an
unknown VAE is refused with one sentence and nothing is recorded; the stored spec then
names the exact bytes (sha256) each adapter ran with.

Tags are taken from the prompt and the negative prompt (the webui reads both since 1.6); the same LoRA
named twice is applied once with the weights summed, which is what applying it twice amounts to.
Embeddings are triggered by their name as a word in either prompt (matched ignoring case, as the webui
matches them through CLIP's lower-cased tokens).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from sqlalchemy.ext.asyncio import AsyncSession

from models.adapters.base import KIND_LABELS, wrong_family
from models.adapters.embeddings import embedding_names_in
from models.adapters.targets import ModelTarget, adapter_fits, canonical_target, model_of
from models.families import Family, family_info
from pipelines.jobs import AdapterRef, JobKind, JobSpec, Limits
from pipelines.prompts import Network, extract_networks
from storage.assets import find_usable_asset, list_usable_assets
from storage.errors import IncompatibleAssetError, InvalidRequestError, NotFoundError, echo
from storage.tables import Asset, AssetKind

__all__ = ["resolve_adapters", "strip_networks"]

log = logging.getLogger(__name__)

_TAG_KINDS = {"lora": AssetKind.LORA, "hypernet": AssetKind.HYPERNETWORK}
_COMMANDS = {AssetKind.LORA: "/lora", AssetKind.HYPERNETWORK: "/hypernet", AssetKind.VAE: "/vae"}


def strip_networks(text: str) -> str:
    """``text`` without its extra-network tags (what the text encoder sees)."""
    return extract_networks(text)[0]


def _check_family(asset: Asset, target: ModelTarget) -> None:
    """Refuse an adapter for another family, or one that does not fit the job's model (see
    :func:`~models.adapters.targets.adapter_fits`), in one sentence naming both."""
    label = KIND_LABELS[asset.kind]
    if asset.family != target.family:
        try:
            raise wrong_family(asset.kind, Family(asset.family), target.family)
        except ValueError:  # a family we no longer serve
            raise InvalidRequestError(f"The {label} {asset.name} does not fit this server's model.") from None
    if adapter_fits(asset.kind, asset.details, target):
        return
    model = model_of(asset.details)
    if model is not None:
        raise IncompatibleAssetError(
            f"The {label} {asset.name} was made for the {model} model; choose that model or another {label}."
        )
    raise IncompatibleAssetError(
        f"The {label} {asset.name} was made for {family_info(target.family).label} models and does not fit "
        f"{target.label}; choose another model or {label}."
    )


def _as_target(model: ModelTarget | Family) -> ModelTarget:
    return model if isinstance(model, ModelTarget) else canonical_target(Family(model))


def _ref(asset: Asset, weight: float = 1.0, te: float | None = None, unet: float | None = None) -> AdapterRef:
    return AdapterRef(
        kind=str(asset.kind),
        name=asset.name,
        sha256=asset.sha256,
        short_hash=asset.short_hash,
        format=asset.format,
        weight=weight,
        te_weight=te if te is not None and te != weight else None,
        unet_weight=unet if unet is not None and unet != weight else None,
    )


async def _require(
    session: AsyncSession, spec: JobSpec, kind: AssetKind, name: str, target: ModelTarget
) -> Asset:
    asset = await find_usable_asset(
        session, user_id=spec.user_id, guild_id=spec.guild_id, kind=kind, name=name
    )
    if asset is None:
        label = KIND_LABELS[kind]
        raise NotFoundError(
            f"There is no {label} called {echo(name)} that you can use here; "
            f"check the name with {_COMMANDS[kind]} list or upload it."
        )
    _check_family(asset, target)
    return asset


def _merge(networks: list[Network]) -> list[Network]:
    """The same network named twice: one entry with the weights summed (order of first appearance)."""
    merged: dict[tuple[str, str], Network] = {}
    for net in networks:
        key = (net.type, net.name.lower())
        if key in merged:
            old = merged[key]
            net = Network(
                net.type,
                old.name,
                old.weight + net.weight,
                old.te_weight + net.te_weight,
                old.unet_weight + net.unet_weight,
            )
        merged[key] = net
    return list(merged.values())


def _check_weight(net: Network, limits: Limits) -> None:
    bound = limits.max_network_weight
    if any(abs(w) > bound for w in (net.weight, net.te_weight, net.unet_weight)):
        raise InvalidRequestError(
            f"The weight of <{net.type}:{net.name}> must be between -{bound:g} and {bound:g}."
        )


async def resolve_adapters(
    session: AsyncSession, spec: JobSpec, model: ModelTarget | Family, limits: Limits
) -> JobSpec:
    """Fill ``spec.adapters`` from its prompts and ``vae`` option, checking access and fit.

    Args:
        session: A database session.
        spec: The job.
        model: The job model's target (:func:`~models.adapters.targets.model_target`); a family stands
            for its canonical shapes.
        limits: The server's limits.

    Raises:
        NotFoundError: a named adapter does not exist or is not visible to this user here.
        IncompatibleAssetError: an adapter is for another model family, or made for another model.
        InvalidRequestError: too many adapters, a weight out of range, or adapters on an upscale job.
    """
    target = _as_target(model)
    (_, positive), (_, negative) = extract_networks(spec.prompt), extract_networks(spec.negative_prompt)
    networks = _merge([*positive, *negative])
    refs: list[AdapterRef] = []
    for net in networks:
        _check_weight(net, limits)
        asset = await _require(session, spec, _TAG_KINDS[net.type], net.name, target)
        if net.type == "lora":
            refs.append(_ref(asset, net.weight, net.te_weight, net.unet_weight))
        else:
            refs.append(_ref(asset, net.weight))
    no_diffusion = spec.kind == JobKind.upscale or (spec.kind == JobKind.erase and not spec.erase_denoise)
    if not no_diffusion:  # without a diffusion model an embedding's name is just a word of the prompt
        refs.extend(await _embeddings(session, spec, target))
    if spec.vae:
        refs.append(_ref(await _require(session, spec, AssetKind.VAE, spec.vae, target)))
    if refs and no_diffusion:
        raise InvalidRequestError(
            f"LoRAs, embeddings, hypernetworks and VAEs do not apply to {spec.kind}; remove them."
        )
    if len(refs) > limits.max_adapters:
        raise InvalidRequestError(
            f"This job uses {len(refs)} adapters; use at most {limits.max_adapters} at once."
        )
    if refs:
        log.debug("job adapters: %s", ", ".join(f"{r.kind}:{r.name}" for r in refs))
    return replace(spec, adapters=tuple(refs))


async def _embeddings(session: AsyncSession, spec: JobSpec, target: ModelTarget) -> list[AdapterRef]:
    """The usable embeddings that fit the job's model whose names occur in either prompt (the user's own
    first); one made for another model is plain text here."""
    text = f"{strip_networks(spec.prompt)}\n{strip_networks(spec.negative_prompt)}"
    if not text.strip():
        return []
    rows = await list_usable_assets(
        session,
        user_id=spec.user_id,
        guild_id=spec.guild_id,
        kind=AssetKind.EMBEDDING,
        family=str(target.family),
    )
    by_name: dict[str, Asset] = {}
    for row in rows:  # preference order within a name: own, guild, public
        if adapter_fits(AssetKind.EMBEDDING, row.details, target):
            by_name.setdefault(row.name.lower(), row)
    used = embedding_names_in(text, [row.name for row in by_name.values()])
    return [_ref(by_name[name.lower()]) for name in used]
