"""Which models exist, where they live and what family they are.

Sources, in order of precedence for a name:
1. ``models`` from the settings: name -> a diffusers folder, a single ``.safetensors`` file or a hub id;
2. an AUTOMATIC1111-style root (``models/Stable-diffusion`` holding single files or diffusers folders);
3. the built-in models (``tiny-sd15``, ``tiny-sdxl``), built on first use under the data folder.
Names match case-insensitively; a single file's name is its stem, as in the webui.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from models.families import Family, detect_family_from_folder
from storage.errors import NotFoundError, echo

__all__ = [
    "A1111_DIRS",
    "SHAPES_INPAINT",
    "SHAPES_MODEL",
    "SHAPES_MODEL_DIR",
    "TINY_BUILTINS",
    "ModelEntry",
    "ModelRegistry",
    "SourceKind",
    "file_sha256",
    "offline",
]

log = logging.getLogger(__name__)

# Sub-folders of an AUTOMATIC1111 install, by asset kind.
A1111_DIRS: dict[str, str] = {
    "checkpoint": "models/Stable-diffusion",
    "lora": "models/Lora",
    "embedding": "embeddings",
    "hypernetwork": "models/hypernetworks",
    "vae": "models/VAE",
    "controlnet": "models/ControlNet",
    "upscaler": "models/ESRGAN",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HASH_CHUNK = 1 << 20


class SourceKind(StrEnum):
    folder = "folder"
    single_file = "single_file"
    hub = "hub"
    builtin = "builtin"


@dataclass(frozen=True)
class ModelEntry:
    """A model the bot can load. ``family`` is None only for hub ids not yet fetched."""

    name: str
    kind: SourceKind
    location: str
    family: Family | None
    default_size: int | None = None  # None: the family's default

    @property
    def built_on_demand(self) -> bool:
        """A tiny random-weight model, built under the built-in models dir on first use."""
        return self.kind == SourceKind.builtin and self.name in TINY_BUILTINS

    @property
    def path(self) -> Path:
        return Path(self.location)


def offline() -> bool:
    """True when the Hugging Face hub must not be contacted."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# The model trained here that follows prompts, shipped with the code: the default when none is configured.
SHAPES_MODEL = "shapes"
SHAPES_MODEL_DIR = Path(__file__).resolve().parent / "shapes" / "model"
SHAPES_SIZE = 64
SHAPES_INPAINT = "shapes-inpaint"
SHAPES_INPAINT_DIR = SHAPES_MODEL_DIR.parent / "inpaint"
# Random-weight tiny models for fast plumbing tests: name -> (family, folder under the built-in models dir).
TINY_BUILTINS: dict[str, tuple[Family, str]] = {
    "tiny-sd15": (Family.sd15, "sd15"),
    "tiny-sdxl": (Family.sdxl, "sdxl"),
    "tiny-sd15-inpaint": (Family.sd15, "sd15-inpaint"),
}
_INPAINT_SUFFIXES = ("-inpaint", "-inpainting", "_inpainting", "-inpainting-fp16")


class ModelRegistry:
    """Finds checkpoints; thread-safe reads, :meth:`refresh` rescans the folders."""

    def __init__(
        self,
        *,
        builtin_dir: Path,
        models_root: Path | None = None,
        extra: Mapping[str, str] | None = None,
        default_model: str | None = None,
        inpaint_models: Mapping[str, str] | None = None,
    ) -> None:
        self.builtin_dir = builtin_dir
        self.models_root = models_root
        self.extra = dict(extra or {})
        self._default = default_model
        self.inpaint_models = {k.lower(): v for k, v in (inpaint_models or {}).items()}
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}
        self.refresh()

    # --- discovery -------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Rescan configured models and the A1111 root."""
        entries: dict[str, ModelEntry] = {
            SHAPES_MODEL: ModelEntry(
                SHAPES_MODEL, SourceKind.builtin, str(SHAPES_MODEL_DIR), Family.sd15, SHAPES_SIZE
            )
        }
        if SHAPES_INPAINT_DIR.is_dir():
            entries[SHAPES_INPAINT] = ModelEntry(
                SHAPES_INPAINT, SourceKind.builtin, str(SHAPES_INPAINT_DIR), Family.sd15, SHAPES_SIZE
            )
        for name, (family, folder) in TINY_BUILTINS.items():
            entries[name.lower()] = ModelEntry(
                name, SourceKind.builtin, str(self.builtin_dir / folder), family
            )
        for entry in self._scan_root():
            entries[entry.name.lower()] = entry
        for name, location in self.extra.items():
            entries[name.lower()] = self._entry_for(name, location)
        with self._lock:
            self._entries = entries

    def _scan_root(self) -> Iterable[ModelEntry]:
        if self.models_root is None:
            return
        folder = self.models_root / A1111_DIRS["checkpoint"]
        if not folder.is_dir():
            log.warning("models_root %s has no %s folder", self.models_root, A1111_DIRS["checkpoint"])
            return
        for child in sorted(folder.iterdir()):
            if child.suffix == ".config":  # a single file's sidecar config folder, not a model
                continue
            if child.is_dir() and (child / "model_index.json").is_file():
                yield self._entry_for(child.name, str(child))
            elif child.is_file() and child.suffix == ".safetensors":
                yield self._entry_for(child.stem, str(child))

    def _entry_for(self, name: str, location: str) -> ModelEntry:
        path = Path(location).expanduser()
        if path.is_dir():
            return ModelEntry(name, SourceKind.folder, str(path), detect_family_from_folder(path))
        if path.is_file():
            from models.single_file import detect_checkpoint

            return ModelEntry(name, SourceKind.single_file, str(path), Family(detect_checkpoint(path).family))
        if _HUB_ID.match(location):
            return ModelEntry(name, SourceKind.hub, location, None)
        raise NotFoundError(
            f"The model {name!r} points at {location!r}, which is neither a file, a folder nor a hub id."
        )

    # --- lookup ----------------------------------------------------------------------------------

    def list(self) -> list[ModelEntry]:
        with self._lock:
            return sorted(
                self._entries.values(), key=lambda e: (e.kind == SourceKind.builtin, e.name.lower())
            )

    @property
    def default_name(self) -> str:
        if self._default:
            return self._default
        configured = [e for e in self.list() if e.kind != SourceKind.builtin]
        return configured[0].name if configured else SHAPES_MODEL

    @property
    def using_builtin_default(self) -> bool:
        return self.require(None).kind == SourceKind.builtin

    def get(self, name: str | None) -> ModelEntry | None:
        key = (name or self.default_name).lower()
        with self._lock:
            return self._entries.get(key)

    def require(self, name: str | None) -> ModelEntry:
        entry = self.get(name)
        if entry is None:
            known = ", ".join(e.name for e in self.list())
            shown = echo(name or self.default_name)
            raise NotFoundError(f"There is no model called {shown!r}; available models: {known}.")
        if entry.kind == SourceKind.hub and offline():
            raise NotFoundError(
                f"The model {entry.name!r} is a Hugging Face hub id, but this bot runs offline; "
                "download it and configure its folder instead."
            )
        return entry

    def inpaint_variant(self, entry: ModelEntry) -> ModelEntry | None:
        """The inpainting (9-channel) model paired with ``entry``, if one is configured or named after it.

        ``inpaint_models`` in the settings wins; else a model called ``<name>-inpainting`` (or ``-inpaint``,
        ``_inpainting``); ``entry`` itself when it already is one.
        """
        if entry.name.lower().endswith(_INPAINT_SUFFIXES):
            return entry
        configured = self.inpaint_models.get(entry.name.lower())
        if configured is not None:
            return self.require(configured)
        for suffix in _INPAINT_SUFFIXES:
            found = self.get(entry.name + suffix)
            if found is not None and found.family == entry.family:
                return found
        return None

    def model_hash(self, entry: ModelEntry) -> str | None:
        """sha256 of the checkpoint file (the UNet weights for a folder), cached by path, size and mtime."""
        target = self._hash_target(entry)
        if target is None:
            return None
        stat = target.stat()
        key = (str(target), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._hashes.get(key)
        if cached is None:
            cached = file_sha256(target)
            with self._lock:
                self._hashes[key] = cached
        return cached

    @staticmethod
    def _hash_target(entry: ModelEntry) -> Path | None:
        if entry.kind == SourceKind.single_file:
            return entry.path
        if entry.kind in (SourceKind.folder, SourceKind.builtin):
            unet = entry.path / "unet"
            for candidate in (
                "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.fp16.safetensors",
            ):
                if (unet / candidate).is_file():
                    return unet / candidate
        return None
