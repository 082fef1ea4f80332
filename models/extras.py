"""ControlNets and upscalers: the models a job uses beside its checkpoint.

Sources, in order of precedence for a name: the settings (``controlnets``/``upscalers``: name -> path),
an AUTOMATIC1111 root (``models/ControlNet``, ``models/ESRGAN``, ``models/RealESRGAN``), then the built-in
ones: the shapes model's scribble ControlNet (trained here, shipped) and the random tiny ones (built on
first use). Names match case-insensitively. Loading happens in the runners, on the worker thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from models.families import Family
from models.registry import SHAPES_MODEL
from storage.errors import NotFoundError, echo

__all__ = [
    "ExtraEntry",
    "ExtraKind",
    "ExtraRegistry",
    "PLAIN_UPSCALERS",
    "SHAPES_CONTROLNET",
    "SHAPES_CONTROLNET_DIR",
]

log = logging.getLogger(__name__)


class ExtraKind(StrEnum):
    controlnet = "controlnet"
    upscaler = "upscaler"  # a GAN upscaler file read by spandrel (ESRGAN, Real-ESRGAN, SwinIR, ...)
    latent_upscaler = "latent_upscaler"  # a StableDiffusionUpscalePipeline folder (the SD x4 upscaler)


@dataclass(frozen=True)
class ExtraEntry:
    """A ControlNet or upscaler the bot can load."""

    name: str
    kind: ExtraKind
    location: str
    family: Family | None = None  # ControlNets only
    control_type: str | None = None  # the control type a ControlNet was trained for, when known
    tiny: bool = False  # a random-weight tiny model, built under the built-in dir on first use

    @property
    def path(self) -> Path:
        return Path(self.location)


SHAPES_CONTROLNET = "shapes-scribble"
SHAPES_CONTROLNET_DIR = Path(__file__).resolve().parent / "shapes" / "controlnet"

# name -> (kind, path under the tiny models dir, family, control type)
_TINY: dict[str, tuple[ExtraKind, str, Family | None, str | None]] = {
    "tiny-controlnet": (ExtraKind.controlnet, "sd15-controlnet", Family.sd15, None),
    "tiny-controlnet-xl": (ExtraKind.controlnet, "sdxl-controlnet", Family.sdxl, None),
    "tiny-esrgan": (ExtraKind.upscaler, "esrgan/tiny_esrgan_x4.safetensors", None, None),
    "tiny-x4": (ExtraKind.latent_upscaler, "upscaler-x4", None, None),
}
#: Upscalers that are plain resampling, no model (the webui lists them too).
PLAIN_UPSCALERS = ("Lanczos", "Nearest")
_CONTROL_WORDS = ("scribble", "canny", "depth", "openpose", "pose", "lineart")
_GAN_SUFFIXES = (".pth", ".pt", ".safetensors")


def _lookup_kind(kind: ExtraKind) -> ExtraKind:
    """GAN and latent upscalers share one namespace of names."""
    return ExtraKind.upscaler if kind == ExtraKind.latent_upscaler else kind


def _control_type_from_name(name: str) -> str | None:
    lowered = name.lower()
    for word in _CONTROL_WORDS:
        if word in lowered:
            return "pose" if word == "openpose" else word
    return None


def _controlnet_family(path: Path) -> Family:
    """SDXL when the config says so (``addition_embed_type`` text_time), else SD 1.x."""
    config = path / "config.json" if path.is_dir() else None
    if config is not None and config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if data.get("addition_embed_type") == "text_time" or data.get("cross_attention_dim") == 2048:
            return Family.sdxl
    elif path.is_file() and "xl" in path.stem.lower():
        return Family.sdxl
    return Family.sd15


class ExtraRegistry:
    """Finds ControlNets and upscalers; thread-safe reads, :meth:`refresh` rescans the folders."""

    def __init__(
        self,
        *,
        builtin_dir: Path,
        models_root: Path | None = None,
        controlnets: Mapping[str, str] | None = None,
        upscalers: Mapping[str, str] | None = None,
    ) -> None:
        self.builtin_dir = builtin_dir
        self.models_root = models_root
        self.controlnets = dict(controlnets or {})
        self.upscalers = dict(upscalers or {})
        self._lock = threading.Lock()
        self._entries: dict[tuple[ExtraKind, str], ExtraEntry] = {}
        self.refresh()

    def refresh(self) -> None:
        found: list[ExtraEntry] = []
        if SHAPES_CONTROLNET_DIR.is_dir():
            found.append(
                ExtraEntry(
                    SHAPES_CONTROLNET,
                    ExtraKind.controlnet,
                    str(SHAPES_CONTROLNET_DIR),
                    Family.sd15,
                    "scribble",
                )
            )
        for name, (kind, rel, family, control) in _TINY.items():
            found.append(ExtraEntry(name, kind, str(self.builtin_dir / rel), family, control, tiny=True))
        found.extend(self._scan_root())
        for name, location in self.controlnets.items():
            found.append(self._controlnet_entry(name, Path(location).expanduser()))
        for name, location in self.upscalers.items():
            found.append(self._upscaler_entry(name, Path(location).expanduser()))
        entries = {(_lookup_kind(e.kind), e.name.lower()): e for e in found}
        with self._lock:
            self._entries = entries

    def _controlnet_entry(self, name: str, path: Path) -> ExtraEntry:
        if not path.exists():
            raise NotFoundError(f"The ControlNet {name!r} points at a path that does not exist.")
        return ExtraEntry(
            name, ExtraKind.controlnet, str(path), _controlnet_family(path), _control_type_from_name(name)
        )

    def _upscaler_entry(self, name: str, path: Path) -> ExtraEntry:
        if path.is_dir() and (path / "model_index.json").is_file():
            return ExtraEntry(name, ExtraKind.latent_upscaler, str(path))
        if path.is_file():
            return ExtraEntry(name, ExtraKind.upscaler, str(path))
        raise NotFoundError(
            f"The upscaler {name!r} must be a GAN model file or an x4 upscaler folder that exists."
        )

    def _scan_root(self) -> Iterable[ExtraEntry]:
        if self.models_root is None:
            return
        folder = self.models_root / "models" / "ControlNet"
        if folder.is_dir():
            for child in sorted(folder.iterdir()):
                if child.is_dir() and (child / "config.json").is_file():
                    yield self._controlnet_entry(child.name, child)
                elif child.is_file() and child.suffix == ".safetensors":
                    yield self._controlnet_entry(child.stem, child)
        for sub in ("ESRGAN", "RealESRGAN"):
            folder = self.models_root / "models" / sub
            if folder.is_dir():
                for child in sorted(folder.iterdir()):
                    if child.is_file() and child.suffix in _GAN_SUFFIXES:
                        yield ExtraEntry(child.stem, ExtraKind.upscaler, str(child))

    # --- lookup ----------------------------------------------------------------------------------

    def list(self, kind: ExtraKind) -> list[ExtraEntry]:
        """Entries of ``kind``; ``upscaler`` lists GAN and latent upscalers together. Configured first."""
        want = {kind} if kind == ExtraKind.controlnet else {ExtraKind.upscaler, ExtraKind.latent_upscaler}
        with self._lock:
            entries = [e for e in self._entries.values() if e.kind in want]
        return sorted(entries, key=lambda e: (e.tiny, e.name.lower()))

    def get_controlnet(self, name: str) -> ExtraEntry | None:
        with self._lock:
            return self._entries.get((ExtraKind.controlnet, name.lower()))

    def get_upscaler(self, name: str) -> ExtraEntry | None:
        with self._lock:
            return self._entries.get((ExtraKind.upscaler, name.lower()))

    def require_controlnet(
        self, name: str | None, *, family: Family, control_type: str, model: str
    ) -> ExtraEntry:
        """The ControlNet ``name``, or the default for ``control_type`` and ``family`` when ``name`` is None.

        The default: for the shapes model, its scribble ControlNet; otherwise the first ControlNet of the
        family whose name says its type (``control_v11p_sd15_canny`` for canny), else the family's only one.

        Raises:
            NotFoundError: no such ControlNet, or none for this type and family.
            IncompatibleAssetError: it was made for another family.
        """
        from storage.errors import IncompatibleAssetError

        if name is not None:
            entry = self.get_controlnet(name)
            if entry is None:
                known = ", ".join(e.name for e in self.list(ExtraKind.controlnet)) or "none"
                raise NotFoundError(f"There is no ControlNet called {echo(name)!r}; available: {known}.")
            if entry.family is not None and entry.family != family:
                raise IncompatibleAssetError(
                    f"The ControlNet {entry.name!r} is for {entry.family.value}, but the model is "
                    f"{family.value}; pick a ControlNet made for it."
                )
            return entry
        candidates = [e for e in self.list(ExtraKind.controlnet) if e.family == family]
        if model.lower() == SHAPES_MODEL:
            candidates = [e for e in candidates if e.name == SHAPES_CONTROLNET] or candidates
        else:  # the shapes ControlNet fits only the shapes UNet
            candidates = [e for e in candidates if e.name != SHAPES_CONTROLNET]
        typed = [e for e in candidates if e.control_type == control_type and not e.tiny]
        untyped = [e for e in candidates if e.control_type is None and not e.tiny]
        for group in (typed, untyped if len(untyped) == 1 else []):
            if group:
                return group[0]
        if model.lower() == SHAPES_MODEL and candidates:
            return candidates[0]
        raise NotFoundError(
            f"No {control_type} ControlNet for {family.value} is installed; name one with the model option "
            "or ask an admin to add one."
        )

    def require_upscaler(self, name: str | None) -> ExtraEntry:
        """The upscaler ``name``; None: the first configured one, else the built-in tiny x4 upscaler."""
        if name is None:
            configured = [e for e in self.list(ExtraKind.upscaler) if not e.tiny]
            return configured[0] if configured else self._require_known_upscaler("tiny-x4")
        return self._require_known_upscaler(name)

    def _require_known_upscaler(self, name: str) -> ExtraEntry:
        entry = self.get_upscaler(name)
        if entry is None:
            known = ", ".join(e.name for e in self.list(ExtraKind.upscaler))
            raise NotFoundError(f"There is no upscaler called {echo(name)!r}; available: {known}.")
        return entry

    def ensure_built(self, entry: ExtraEntry) -> Path:
        """The entry's path, building the tiny model family first when the entry is a tiny one."""
        if entry.tiny:
            from models.tiny import ensure_tiny_models

            ensure_tiny_models(self.builtin_dir)
        return entry.path
