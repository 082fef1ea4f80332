"""Settings, from environment variables (``DREAMCORD_*``) and an optional TOML file.

Secrets (the Discord token, a database URL that may hold a password, import tokens) are ``SecretStr``:
``repr``, ``str`` and dumps show ``**********``; only the code that uses one unwraps it.

Precedence, highest first: keyword arguments, environment variables, the TOML file named by
``DREAMCORD_CONFIG`` (default ``./dreamcord.toml`` when it exists), the defaults below.
Every default is embedded: with no settings at all the bot uses ``./data`` and the built-in tiny model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from models.extras import ExtraRegistry
from models.registry import ModelRegistry

__all__ = ["Settings", "build_extras", "build_registry", "load_settings"]

CONFIG_ENV = "DREAMCORD_CONFIG"


class Settings(BaseSettings):
    """Everything an admin can set. Env var names are the field names upper-cased with ``DREAMCORD_``."""

    model_config = SettingsConfigDict(env_prefix="DREAMCORD_", extra="forbid", env_nested_delimiter="__")

    data_dir: Path = Field(Path("data"), description="Database, file store and built-in models live here.")
    database_url: SecretStr | None = Field(
        None,
        description="Any SQLAlchemy async URL; default: SQLite in data_dir. Kept secret (it may hold a "
        "password): shown as ********** in reprs and dumps.",
    )
    models_root: Path | None = Field(
        None,
        description="An AUTOMATIC1111 install (or its layout): models/Stable-diffusion, models/Lora, ...",
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Extra models: name -> diffusers folder, .safetensors file or hub id.",
    )
    inpaint_models: dict[str, str] = Field(
        default_factory=dict,
        description="model name -> its inpainting model's name (default: a model called <name>-inpainting).",
    )
    controlnets: dict[str, str] = Field(
        default_factory=dict, description="ControlNets: name -> diffusers folder or .safetensors file."
    )
    upscalers: dict[str, str] = Field(
        default_factory=dict,
        description="Upscalers: name -> GAN model file (.pth/.safetensors) or SD x4 upscaler folder.",
    )
    builtin_models_dir: Path | None = Field(
        None, description="Where the built-in models are built and cached; default: data_dir/tiny-models."
    )
    default_model: str | None = Field(None, description="Model used when a request names none.")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    pipeline_cache_mb: int = Field(12_000, ge=0, description="Memory budget for loaded pipelines.")
    asset_max_mb: dict[str, int] = Field(
        default_factory=dict,
        description="Largest upload per asset kind in MB (lora, embedding, hypernetwork, vae); "
        "unset kinds keep the defaults 1024 / 16 / 512 / 1024.",
    )
    user_storage_mb: int = Field(2_048, ge=0, description="Uploads one user may keep, in MB (all kinds).")
    adapter_cache_mb: int = Field(2_048, ge=0, description="Memory for recently used adapter weights.")
    queue_per_user: int = Field(10, ge=1, description="Jobs one user may have waiting or running.")
    queue_per_guild: int = Field(100, ge=1, description="Jobs one server may have waiting or running.")
    queue_max: int = Field(1000, ge=1, description="Jobs waiting in all; past it new jobs are refused.")
    job_attempts: int = Field(3, ge=1, description="Starts before a job interrupted by crashes is given up.")
    batch_max_images: int = Field(8, ge=1, description="Images one shared pipeline call may make.")
    batch_max_pixels: int = Field(
        8 * 512 * 512, ge=1, description="Images × width × height one shared pipeline call may make."
    )
    job_timeout_s: float = Field(600.0, gt=0, description="A job running longer is stopped.")
    worker_stuck_s: float = Field(
        600.0, gt=0, description="No progress this long: the worker gives the job up."
    )
    preview_every: int = Field(5, ge=0, description="Steps between live previews (0: none).")
    import_hosts: list[str] | None = Field(
        None,
        description="Hosts `/lora import` may fetch from (a leading dot allows subdomains); "
        "default: Hugging Face and Civitai and their download CDNs.",
    )
    import_timeout_s: float = Field(300.0, gt=0, description="A URL import taking longer is stopped.")
    import_tokens: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="API tokens for URL imports: host -> token (e.g. civitai.com, huggingface.co), sent as "
        "`Authorization: Bearer` to exactly that host, never to a host it redirects to.",
    )
    discord_token: SecretStr | None = Field(None, description="The bot's token (kept secret).")
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get(CONFIG_ENV, "dreamcord.toml"))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url is not None and self.database_url.get_secret_value():
            return self.database_url.get_secret_value()
        return f"sqlite+aiosqlite:///{(self.data_dir / 'dreamcord.db').resolve()}"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def tiny_models_dir(self) -> Path:
        return self.builtin_models_dir or self.data_dir / "tiny-models"


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment and the TOML file, with ``overrides`` on top."""
    return Settings(**overrides)


def build_registry(settings: Settings) -> ModelRegistry:
    """The model registry the settings describe (also used by commands that load no model)."""
    return ModelRegistry(
        builtin_dir=settings.tiny_models_dir,
        models_root=settings.models_root,
        extra=settings.models,
        default_model=settings.default_model,
        inpaint_models=settings.inpaint_models,
    )


def build_extras(settings: Settings) -> ExtraRegistry:
    """The ControlNets and upscalers the settings describe."""
    return ExtraRegistry(
        builtin_dir=settings.tiny_models_dir,
        models_root=settings.models_root,
        controlnets=settings.controlnets,
        upscalers=settings.upscalers,
    )
