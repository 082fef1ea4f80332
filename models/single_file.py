"""Load A1111 / Civitai single-file ``.safetensors`` checkpoints offline, with config folders we ship.

A single file holds only weights in the original LDM layout. Diffusers needs a config folder to build the
pipeline around them; ``from_single_file`` would download one from the Hub, so we pass our own:
``models/configs/<sd15|sd15-inpaint|sdxl|sdxl-inpaint>/`` (config JSON only, no weights, no tokenizer
files; the tokenizers come from the shared CLIP vocabulary unless the folder has its own). An admin can
override the folder for one checkpoint by putting a ``<stem>.config/`` folder beside it.

Pickled ``.ckpt`` files are refused. Diffusers would open them with ``torch.load(weights_only=True)``,
which is much safer than plain unpickling but is still a pickle parser that has had bypasses; checkpoints
come from strangers, so we keep to safetensors. Convert ``.ckpt`` files outside the bot.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from storage.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

__all__ = [
    "CONFIGS_DIR",
    "CheckpointKind",
    "detect_checkpoint",
    "detect_family",
    "load_single_file",
    "read_safetensors_keys",
    "resolve_config_dir",
]

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

FamilyName = Literal["sd15", "sdxl"]

_UNET_PREFIX = "model.diffusion_model."
_UNET_IN = _UNET_PREFIX + "input_blocks.0.0.weight"
_UNET_ADM = _UNET_PREFIX + "label_emb.0.0.weight"
_SD1_PREFIX = "cond_stage_model.transformer."
_SD1_TOKENS = "embeddings.token_embedding.weight"  # under _SD1_PREFIX, with or without "text_model."
_XL_L_TOKENS = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
_XL_G_PREFIX = "conditioner.embedders.1.model."
_XL_G_TOKENS = _XL_G_PREFIX + "token_embedding.weight"
_CROSS_ATTENTION_SUFFIX = ".attn2.to_k.weight"
_TEXT_SLOTS = {  # pipeline attribute -> LDM prefix, per family
    "sd15": {"text_encoder": _SD1_PREFIX},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": _XL_G_PREFIX},
}
_TOKENIZER_PADS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}  # SDXL's second pads with "!"

_NOT_SD = "That checkpoint is not a Stable Diffusion 1.x or SDXL model I can load."
_NOT_SAFETENSORS = "I only load .safetensors checkpoints, not pickled .ckpt files; convert it and try again."
_UNREADABLE = "That file is not a readable safetensors checkpoint; it may be damaged or incomplete."
_MISMATCH = "That checkpoint's weights do not fit the Stable Diffusion layout I expected; it may be damaged."
_MISSING = "That checkpoint is missing some of its weights, so I can't load it."


@dataclass(frozen=True, slots=True)
class CheckpointKind:
    """What a single-file checkpoint holds.

    Attributes:
        family: ``"sd15"`` (any SD 1.x) or ``"sdxl"`` (SDXL base layout).
        inpainting: The UNet takes 9 input channels (latents, mask, masked-image latents).
        prediction_type: ``"epsilon"``, or ``"v_prediction"`` when the file carries a ``v_pred`` marker key
            (the convention ComfyUI and Civitai v-prediction models use).
    """

    family: FamilyName
    inpainting: bool = False
    prediction_type: str = "epsilon"

    @property
    def config_name(self) -> str:
        """The shipped config folder's name: ``sd15``, ``sd15-inpaint``, ``sdxl`` or ``sdxl-inpaint``."""
        return f"{self.family}-inpaint" if self.inpainting else self.family


def read_safetensors_keys(path: Path | str) -> dict[str, tuple[int, ...]]:
    """Read the tensor names and shapes from a safetensors header, without loading any tensor.

    Raises:
        InvalidRequestError: the file is not a readable safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except SafetensorError as exc:
        raise InvalidRequestError(_UNREADABLE) from exc


def _context_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The UNet's cross-attention context width, from any ``attn2.to_k`` weight (out × context)."""
    for key, shape in shapes.items():
        if key.startswith(_UNET_PREFIX) and key.endswith(_CROSS_ATTENTION_SUFFIX) and len(shape) == 2:
            return shape[1]
    return None


def _text_width(shapes: Mapping[str, tuple[int, ...]], key: str) -> int | None:
    shape = shapes.get(key)
    return shape[1] if shape is not None and len(shape) == 2 else None


def _family(key_set: set[str], shapes: Mapping[str, tuple[int, ...]]) -> tuple[FamilyName, int] | None:
    """The family and the context width its text encoder(s) produce, or ``None`` when neither fits."""
    clip_l = _text_width(shapes, f"{_SD1_PREFIX}text_model.{_SD1_TOKENS}")
    if clip_l is None:  # the older layout A1111 still reads: no "text_model." level
        clip_l = _text_width(shapes, _SD1_PREFIX + _SD1_TOKENS)
    xl_l, xl_g = _text_width(shapes, _XL_L_TOKENS), _text_width(shapes, _XL_G_TOKENS)
    if clip_l is not None and xl_l is None and xl_g is None:
        return "sd15", clip_l
    if clip_l is None and xl_l is not None and xl_g is not None and _UNET_ADM in key_set:
        return "sdxl", xl_l + xl_g
    return None


def detect_family(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> CheckpointKind:
    """Tell an SD 1.x checkpoint from an SDXL one (and an inpainting UNet from a plain one) by its keys.

    SD 1.x has its CLIP ViT-L text encoder under ``cond_stage_model.transformer``; SDXL has CLIP ViT-L under
    ``conditioner.embedders.0.transformer`` plus OpenCLIP bigG under ``conditioner.embedders.1.model`` and
    a ``label_emb`` size embedding. The UNet's cross-attention width must equal the text encoders' total
    width (768 for SD 1.x, 2048 for SDXL) and its first convolution must take 4 or 9 channels.

    Args:
        keys: Every tensor name in the checkpoint.
        shapes: Tensor shapes by name (at least those of the keys named above).

    Raises:
        InvalidRequestError: anything else (SD 2.x, an SDXL refiner, a LoRA, a UNet-only file, ...).
    """
    key_set = set(keys)
    in_shape = shapes.get(_UNET_IN)
    found = _family(key_set, shapes)
    if in_shape is None or len(in_shape) != 4 or found is None:
        raise InvalidRequestError(_NOT_SD)
    family, text_width = found
    if _context_width(shapes) != text_width or in_shape[1] not in (4, 9):
        raise InvalidRequestError(_NOT_SD)
    prediction = "v_prediction" if "v_pred" in key_set else "epsilon"
    return CheckpointKind(family=family, inpainting=in_shape[1] == 9, prediction_type=prediction)


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        raise InvalidRequestError(_NOT_SAFETENSORS)


def detect_checkpoint(path: Path | str) -> CheckpointKind:
    """Read a ``.safetensors`` checkpoint's header and detect its kind (see :func:`detect_family`).

    Raises:
        InvalidRequestError: not a ``.safetensors`` file, unreadable, or not SD 1.x / SDXL.
    """
    _check_suffix(Path(path))
    shapes = read_safetensors_keys(path)
    return detect_family(shapes.keys(), shapes)


def resolve_config_dir(path: Path | str, kind: CheckpointKind, config_dir: Path | str | None = None) -> Path:
    """The config folder for a checkpoint: ``config_dir``, else a ``<stem>.config/`` beside it, else ours."""
    if config_dir is not None:
        return Path(config_dir)
    path = Path(path)
    sidecar = path.with_name(f"{path.stem}.config")
    if (sidecar / "model_index.json").is_file():
        log.info("using the config folder beside %s", path.name)
        return sidecar
    return CONFIGS_DIR / kind.config_name


def _pipeline_class(config_dir: Path) -> Any:
    import diffusers

    index = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))
    return getattr(diffusers, index["_class_name"])


def _tokenizers(config_dir: Path, pipeline_cls: Any) -> dict[str, Any]:
    """Tokenizer objects for the pipeline's tokenizer slots that ``config_dir`` has no files for."""
    params = inspect.signature(pipeline_cls.__init__).parameters
    missing = [name for name in _TOKENIZER_PADS if name in params and not (config_dir / name).is_dir()]
    if not missing:
        return {}
    from models.tokenizer import load_clip_tokenizer

    return {name: load_clip_tokenizer(pad_token=_TOKENIZER_PADS[name]) for name in missing}


def _read_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, prefix removed (only those are read from disk)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key[len(prefix) :]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}


def _clip_state(weights: dict[str, torch.Tensor], wrapped: bool) -> dict[str, torch.Tensor]:
    """CLIP ViT-L weights in transformers' layout, from ``text_model.*`` or the older unwrapped keys.

    ``position_ids`` is dropped: it is a fixed buffer, and merged checkpoints often carry a damaged copy.
    """
    state = {key.removeprefix("text_model."): value for key, value in weights.items()}
    state.pop("embeddings.position_ids", None)
    return {f"text_model.{key}": value for key, value in state.items()} if wrapped else state


def _load_text_encoder(
    path: Path, config_dir: Path, name: str, prefix: str, torch_dtype: torch.dtype | None
) -> Any:
    """Build one text encoder from its LDM slot, read by name rather than guessed from widths.

    Diffusers picks SDXL's slots by comparing widths, which goes wrong when both encoders have the same
    width (tiny test models), and it does not read the older SD 1.x layout without ``text_model.``.
    """
    import transformers
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    index = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))
    model_cls = getattr(transformers, index[name][1])
    config = model_cls.config_class.from_pretrained(str(config_dir / name), local_files_only=True)
    with init_empty_weights():
        model = model_cls(config)
    if prefix.endswith(".model."):  # OpenCLIP layout (SDXL's bigG)
        state = convert_open_clip_checkpoint(model, _read_prefixed(path, prefix), prefix="")
    else:
        state = _clip_state(_read_prefixed(path, prefix), wrapped=hasattr(model, "text_model"))
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # mis-shaped weights
        log.warning("the %s weights of %s do not fit: %s", name, path.name, exc)
        raise InvalidRequestError(_MISMATCH) from exc
    if result.unexpected_keys:
        log.warning("ignoring %d unknown %s weights in %s", len(result.unexpected_keys), name, path.name)
    module: torch.nn.Module = model  # missing weights stay on "meta": _check_complete refuses them
    if torch_dtype is not None:
        module.to(torch_dtype)
    return module.eval()


def _check_complete(pipe: Any) -> None:
    import torch

    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            tensors = [*module.parameters(), *module.buffers()]
            if any(tensor.device.type == "meta" for tensor in tensors):
                raise InvalidRequestError(_MISSING)


def load_single_file(
    path: Path | str,
    *,
    torch_dtype: torch.dtype | None = None,
    config_dir: Path | str | None = None,
    pipeline_cls: type[DiffusionPipeline] | None = None,
) -> DiffusionPipeline:
    """Build a pipeline from one SD 1.x / SDXL ``.safetensors`` checkpoint, never touching the network.

    Args:
        path: The checkpoint.
        torch_dtype: Weight dtype of the loaded modules (``None`` keeps the file's).
        config_dir: A diffusers config folder to use instead of the sidecar or shipped one.
        pipeline_cls: The pipeline class to build (e.g. an img2img pipeline over the same components);
            defaults to the config folder's ``model_index.json`` class.

    Raises:
        InvalidRequestError: not a safetensors file, not SD 1.x / SDXL, or weights that do not fit.
    """
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    path = Path(path)
    kind = detect_checkpoint(path)
    folder = resolve_config_dir(path, kind, config_dir)
    cls = pipeline_cls if pipeline_cls is not None else _pipeline_class(folder)
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = _tokenizers(folder, cls)
    if "safety_checker" in params:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    for name, prefix in _TEXT_SLOTS[kind.family].items():
        if name in params:
            kwargs[name] = _load_text_encoder(path, folder, name, prefix, torch_dtype)
    log.info("loading %s checkpoint %s with %s", kind.config_name, path.name, cls.__name__)
    try:
        pipe = cls.from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=torch_dtype, **kwargs
        )
    except (SingleFileComponentError, ValueError) as exc:  # mis-shaped weights raise ValueError
        log.warning("single-file load of %s failed: %s", path.name, exc, exc_info=True)
        raise InvalidRequestError(_MISMATCH) from exc
    _check_complete(pipe)
    if kind.prediction_type != "epsilon":
        scheduler = pipe.scheduler
        pipe.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=kind.prediction_type)
    return pipe
