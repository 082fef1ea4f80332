"""``dreamcord bench``'s adapter part: what switching LoRAs between jobs costs, next to plain jobs.

Jobs alternate LoRA A, LoRA B and none on a model with SD 1.5's real shapes (random weights, 64×64), the way
a busy server mixes users' requests. Each LoRA is loaded once and stays resident, so after the first use a
job only switches adapters on or off; the report gives the per-job cost relative to plain jobs measured in
the same run (goal ≤ 1.10×) and what the first load of a file costs.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch
from safetensors.torch import save_file

from models.adapters.lora_layers import layer_table
from models.families import Family
from models.sd15_reference import ensure_sd15_reference
from pipelines.asset_uploads import add_asset_file
from pipelines.bench import scratch_settings
from pipelines.engine import Engine
from pipelines.jobs import JobSpec
from pipelines.settings import Settings
from storage.assets import SERVER_OWNER_ID
from storage.tables import Visibility

__all__ = ["run_adapter_bench", "synthetic_kohya_lora"]

log = logging.getLogger(__name__)

_ATTENTION: tuple[str, ...] = tuple(
    f"attn{i}.to_{p}" for i in (1, 2) for p in ("q", "k", "v", "out.0")
) + tuple(f"self_attn.{p}_proj" for p in ("q", "k", "v", "out"))


def synthetic_kohya_lora(path: Path, *, rank: int, seed: int) -> Path:
    """A kohya-format SD 1.5 LoRA over every attention projection of the UNet and the text encoder."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, str]] = set()
    for name, target in sorted(layer_table(Family.sd15).aliases.items()):
        key = (target.component, target.module)
        if target.kernel or not target.module.endswith(_ATTENTION) or key in seen:
            continue
        seen.add(key)
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, target.in_features, generator=generator) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(target.out_features, rank, generator=generator) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(
        {k: v.to(torch.float16) for k, v in tensors.items()},
        str(path),
        metadata={
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(rank),
            "ss_base_model_version": "sd_v1",
        },
    )
    return path


async def _timed(engine: Engine, spec: JobSpec) -> float:
    started = time.perf_counter()
    await engine.generate(spec)
    return time.perf_counter() - started


async def run_adapter_bench(
    settings: Settings,
    *,
    repeats: int = 6,
    steps: int = 10,
    size: int = 64,
    reference_dir: Path | None = None,
) -> dict[str, Any]:
    """Per-job cost of alternating LoRA A, LoRA B and none, relative to plain jobs, as a JSON-ready dict.

    Args:
        settings: The caller's settings (their data dir holds the cached reference model).
        repeats: A/B/none cycles timed (after one warm-up cycle that loads each file).
        steps: Sampling steps per job.
        size: Image side in pixels (64 keeps a step of the full-size UNet cheap on a CPU).
        reference_dir: Where the SD 1.5-shaped model is (built there, ~2 GB, if missing).
    """
    reference = ensure_sd15_reference(reference_dir or settings.data_dir / "reference-models" / "sd15")
    with TemporaryDirectory(prefix="dreamcord-bench-adapters-") as scratch:
        work = Path(scratch)
        bench_settings = scratch_settings(settings, work / "data").model_copy(
            update={"models": {"sd15-reference": str(reference)}, "default_model": "sd15-reference"}
        )
        async with Engine(bench_settings) as engine:
            for name, seed in (("styleA", 1), ("styleB", 2)):
                lora = synthetic_kohya_lora(work / f"{name}.safetensors", rank=16, seed=seed)
                await add_asset_file(
                    engine, lora, name=name, owner_id=SERVER_OWNER_ID, visibility=Visibility.PUBLIC
                )

            def job(tag: str) -> JobSpec:
                return JobSpec(f"a lighthouse at dusk{tag}", width=size, height=size, steps=steps, seed=3)

            plain_spec, a_spec, b_spec = job(""), job(" <lora:styleA:0.8>"), job(" <lora:styleB:0.8>")
            await _timed(engine, plain_spec)  # load the model
            plain = [await _timed(engine, plain_spec) for _ in range(repeats)]  # before any LoRA exists
            first_loads = [await _timed(engine, a_spec), await _timed(engine, b_spec)]
            await _timed(engine, plain_spec)
            times: dict[str, list[float]] = {"a": [], "b": [], "none": []}
            for _ in range(repeats):
                for key, spec in (("a", a_spec), ("b", b_spec), ("none", plain_spec)):
                    times[key].append(await _timed(engine, spec))
    plain_median = statistics.median(plain)
    alternating = [t for cycle in zip(times["a"], times["b"], times["none"], strict=True) for t in cycle]
    return {
        "benchmark": "adapter_switching",
        "model": "sd15-reference (SD 1.5 shapes, random weights)",
        "size": f"{size}x{size}",
        "steps": steps,
        "repeats": repeats,
        "lora_rank": 16,
        "plain_s_median": round(plain_median, 4),
        "lora_a_s_median": round(statistics.median(times["a"]), 4),
        "lora_b_s_median": round(statistics.median(times["b"]), 4),
        "none_between_s_median": round(statistics.median(times["none"]), 4),
        "first_use_s": [round(t, 4) for t in first_loads],
        "alternating_vs_plain": round(statistics.median(alternating) / plain_median, 4),
        "goal_ratio_max": 1.10,
        "torch_threads": torch.get_num_threads(),
    }
