"""Model families (SD 1.x and SDXL): defaults and how to recognise one from a diffusers config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from storage.errors import InvalidRequestError

__all__ = [
    "FAMILIES",
    "SD_NOISE_SCHEDULE",
    "Family",
    "FamilyInfo",
    "detect_family_from_folder",
    "family_info",
]

#: The noise schedule SD 1.x and SDXL were trained with: 1000 steps, scaled_linear 0.00085-0.012, epsilon.
SD_NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


class Family(StrEnum):
    sd15 = "sd15"
    sdxl = "sdxl"


@dataclass(frozen=True)
class FamilyInfo:
    """What the rest of the code needs to know about a family."""

    family: Family
    label: str
    default_size: int
    cross_attention_dim: int
    txt2img_class: str


FAMILIES: dict[Family, FamilyInfo] = {
    Family.sd15: FamilyInfo(Family.sd15, "SD 1.5", 512, 768, "StableDiffusionPipeline"),
    Family.sdxl: FamilyInfo(Family.sdxl, "SDXL", 1024, 2048, "StableDiffusionXLPipeline"),
}


def family_info(family: str) -> FamilyInfo:
    return FAMILIES[Family(family)]


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise InvalidRequestError(f"The model config {path.name} is not a JSON object.")
    return data


def detect_family_from_folder(folder: Path) -> Family:
    """Family of a diffusers pipeline folder, from model_index.json and the UNet config."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise InvalidRequestError(
            f"The model folder {folder.name} has no model_index.json; is it a diffusers model?"
        )
    index = _read_json(index_path)
    class_name = str(index.get("_class_name", ""))
    if "XL" in class_name or "text_encoder_2" in index:
        return Family.sdxl
    unet_config = folder / "unet" / "config.json"
    if unet_config.is_file() and _read_json(unet_config).get("addition_embed_type") == "text_time":
        return Family.sdxl
    if class_name.startswith("StableDiffusion"):
        return Family.sd15
    raise InvalidRequestError(
        f"The model {folder.name} is a {class_name or 'unknown'} pipeline; "
        "only SD 1.x and SDXL models are supported."
    )
