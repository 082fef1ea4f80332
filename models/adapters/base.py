"""What every adapter kind reports about a file: its kind, format, family and details."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.families import Family, family_info
from storage.errors import IncompatibleAssetError
from storage.tables import AssetKind

__all__ = ["KIND_LABELS", "AssetInfo", "wrong_family"]

#: How each kind is named in sentences for users.
KIND_LABELS: dict[AssetKind, str] = {kind: kind.label for kind in AssetKind}


@dataclass(frozen=True)
class AssetInfo:
    """What a file was recognised as.

    Attributes:
        kind: LoRA, embedding, hypernetwork or VAE.
        format: The file layout, e.g. ``kohya``, ``peft``, ``webui-pt``, ``lycoris-lokr``.
        family: The model family its shapes fit.
        details: JSON-ready facts for users (rank, vectors, layers, whether it can be applied...).
    """

    kind: AssetKind
    format: str
    family: Family
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for users, e.g. ``LoRA, kohya format, SD 1.5, rank 16``."""
        parts = [
            KIND_LABELS.get(self.kind, str(self.kind)),
            f"{self.format} format",
            family_info(self.family).label,
        ]
        if "rank" in self.details:
            parts.append(f"rank {self.details['rank']}")
        if "vectors" in self.details:
            n = int(self.details["vectors"])
            parts.append(f"{n} vector{'s' if n != 1 else ''}")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": str(self.kind),
            "format": self.format,
            "family": str(self.family),
            "details": self.details,
        }


def wrong_family(kind: AssetKind, found: Family, expected: Family) -> IncompatibleAssetError:
    """The refusal for a file made for another family, naming both."""
    label = KIND_LABELS.get(kind, str(kind))
    return IncompatibleAssetError(
        f"This {label} is for {family_info(found).label}; "
        f"this server's model is {family_info(expected).label}."
    )
