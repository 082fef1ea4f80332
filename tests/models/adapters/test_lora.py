"""Tests for recognising LoRA files (models.adapters.lora): real files from ../shared/fixtures/lora and kohya
files written here the way kohya's sd-scripts names SD 1.5 and SDXL layers.

Applying them to the SD 1.5-shaped reference model is in test_lora_apply.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from models.adapters.lora import (
    BROKEN_MESSAGE,
    FOREIGN_MESSAGE,
    NO_FIT_MESSAGE,
    SD2_MESSAGE,
    inspect_lora,
    lora_hash,
    lora_short_hash,
    peft_config_metadata,
    prepare_lora,
)
from models.adapters.safe_files import load_state_dict, read_safetensors_header
from models.families import Family
from storage.errors import InvalidRequestError
from storage.tables import AssetKind

MAX_BYTES = 64 * 2**20

# --- SD 1.5 and SDXL layers, written out from the published architectures (not from the code under test) ----

#: SD 1.5's transformer blocks and their widths: down 320/640/1280, up 1280/640/320, middle 1280.
SD15_BLOCKS = {
    **{f"down_blocks.{b}.attentions.{a}": w for b, w in enumerate((320, 640, 1280)) for a in range(2)},
    **{f"up_blocks.{b}.attentions.{a}": w for b, w in ((1, 1280), (2, 640), (3, 320)) for a in range(3)},
    "mid_block.attentions.0": 1280,
}


def sd15_kohya_layers() -> dict[str, tuple[int, int, tuple[int, int] | None]]:
    """kohya name -> (in, out, kernel) for attention, feed-forward, projections, a resnet conv and CLIP-L."""
    layers: dict[str, tuple[int, int, tuple[int, int] | None]] = {}
    for block, w in SD15_BLOCKS.items():
        tb = f"{block}.transformer_blocks.0"
        widths = {
            f"{tb}.attn1.to_q": (w, w),
            f"{tb}.attn1.to_k": (w, w),
            f"{tb}.attn1.to_v": (w, w),
            f"{tb}.attn1.to_out.0": (w, w),
            f"{tb}.attn2.to_q": (w, w),
            f"{tb}.attn2.to_k": (768, w),
            f"{tb}.attn2.to_v": (768, w),
            f"{tb}.attn2.to_out.0": (w, w),
            f"{tb}.ff.net.0.proj": (w, 8 * w),
            f"{tb}.ff.net.2": (4 * w, w),
        }
        layers.update({"lora_unet_" + k.replace(".", "_"): (i, o, None) for k, (i, o) in widths.items()})
        layers["lora_unet_" + f"{block}.proj_in".replace(".", "_")] = (w, w, (1, 1))
    layers["lora_unet_down_blocks_0_resnets_0_conv1"] = (320, 320, (3, 3))
    for i in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layers[f"lora_te_text_model_encoder_layers_{i}_self_attn_{proj}"] = (768, 768, None)
        layers[f"lora_te_text_model_encoder_layers_{i}_mlp_fc1"] = (768, 3072, None)
        layers[f"lora_te_text_model_encoder_layers_{i}_mlp_fc2"] = (3072, 768, None)
    return layers


def kohya_state_dict(
    layers: dict[str, tuple[int, int, tuple[int, int] | None]],
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A kohya LoRA: ``lora_down`` (rank, in[, kh, kw]), ``lora_up`` (out, rank[, 1, 1]), scalar ``alpha``."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, (i, o, kernel) in layers.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, i, *(kernel or ()), generator=gen) * 0.1
        sd[f"{name}.lora_up.weight"] = torch.randn(o, rank, *((1, 1) if kernel else ()), generator=gen) * 0.1
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


#: An SDXL LoRA as kohya writes it: SGM block names for the UNet, lora_te1/lora_te2 for the two encoders.
SDXL_KOHYA_LAYERS: dict[str, tuple[int, int, tuple[int, int] | None]] = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (2048, 640, None),
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v": (2048, 640, None),
    "lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q": (1280, 1280, None),
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k": (2048, 1280, None),
    "lora_unet_output_blocks_3_1_proj_in": (640, 640, None),
    "lora_unet_output_blocks_3_0_in_layers_2": (1920, 640, (3, 3)),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768, None),
    "lora_te2_text_model_encoder_layers_31_mlp_fc1": (1280, 5120, None),
}


def save(
    tmp_path: Path, name: str, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=metadata)
    return path


# --- the real files -----------------------------------------------------------------------------------------

#: file -> (format, rank, number of layers, parts); counted from the files' own key lists by hand.
FIXTURES: dict[str, tuple[str, int, int, list[str]]] = {
    # cloneofsimo: 16 transformer blocks x 9 Linear layers + 12 CLIP layers x 4 projections
    "analog_svd_rank4.safetensors": ("cloneofsimo", 4, 144 + 48, ["text_encoder", "unet"]),
    "lora_disney.safetensors": ("cloneofsimo", 1, 144 + 48, ["text_encoder", "unet"]),
    # 16 blocks x (attn1 + attn2) x (q, k, v, out)
    "diffusers_old_format_pytorch_lora_weights.safetensors": ("diffusers-old", 4, 128, ["unet"]),
    # 12 CLIP layers x (q_proj, v_proj)
    "sd15_text_encoder_adapter_model.safetensors": ("peft", 8, 24, ["text_encoder"]),
    # 1750 keys / 5 per layer (alpha + four factors)
    "smart_falcon_4_lokr.safetensors": ("lycoris-lokr", 4, 350, ["text_encoder", "unet"]),
    "smart_falcon_16_lokr.safetensors": ("lycoris-lokr", 16, 350, ["text_encoder", "unet"]),
}


@pytest.mark.parametrize("filename", sorted(FIXTURES))
def test_every_real_file_is_recognised_from_its_header(fixtures_dir: Path, filename: str) -> None:
    fmt, rank, layers, parts = FIXTURES[filename]
    info = inspect_lora(read_safetensors_header(fixtures_dir / "lora" / filename))
    assert info is not None
    assert (info.kind, info.format, info.family) == (AssetKind.LORA, fmt, Family.sd15)
    assert (info.details["rank"], info.details["layers"], info.details["parts"]) == (rank, layers, parts)
    assert info.details["applicable"] is True
    assert info.describe() == f"LoRA, {fmt} format, SD 1.5, rank {rank}"


@pytest.mark.parametrize("filename", sorted(FIXTURES))
def test_loaded_tensors_give_the_same_answer_as_the_header(fixtures_dir: Path, filename: str) -> None:
    path = fixtures_dir / "lora" / filename
    header = read_safetensors_header(path)
    from_header = inspect_lora(header)
    from_tensors = inspect_lora(load_state_dict(path, max_bytes=MAX_BYTES), header.metadata)
    assert from_header is not None and from_tensors is not None
    assert from_tensors == from_header


def test_lokr_metadata_and_alpha_are_reported(fixtures_dir: Path) -> None:
    path = fixtures_dir / "lora" / "smart_falcon_16_lokr.safetensors"
    info = inspect_lora(load_state_dict(path, max_bytes=MAX_BYTES), read_safetensors_header(path).metadata)
    assert info is not None
    assert info.details["alpha"] == 16.0
    assert info.details["output_name"] == "smart_falcon_16_lokr"
    assert info.details["trained_on"] == "animefull-final-pruned.safetensors"
    assert info.details["network_module"] == "lycoris.kohya"


def test_cloneofsimo_tokens_are_listed(fixtures_dir: Path) -> None:
    info = inspect_lora(read_safetensors_header(fixtures_dir / "lora" / "lora_disney.safetensors"))
    assert info is not None and info.details["tokens"] == ["<s1>", "<s2>"]


@pytest.mark.parametrize("filename", ["smart_falcon_4_lokr.safetensors", "smart_falcon_16_lokr.safetensors"])
def test_short_hash_is_the_webui_lora_hash(fixtures_dir: Path, filename: str) -> None:
    path = fixtures_dir / "lora" / filename
    expected = read_safetensors_header(path).metadata["sshs_model_hash"]
    assert lora_hash(path) == expected
    assert lora_short_hash(path) == expected[:12]


def test_short_hash_skips_exactly_the_header_and_hashes_pickles_whole(tmp_path: Path) -> None:
    path = save(tmp_path, "x.safetensors", {"lora_unet_a.alpha": torch.tensor(1.0)})
    raw = path.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little") :]
    assert lora_short_hash(path) == hashlib.sha256(data).hexdigest()[:12]
    pt = tmp_path / "x.pt"
    torch.save({"lora_unet_a.alpha": torch.tensor(1.0)}, pt)
    assert lora_short_hash(pt) == hashlib.sha256(pt.read_bytes()).hexdigest()[:12]


@pytest.mark.parametrize("filename", ["EasyNegative.safetensors"])
def test_an_embedding_is_not_a_lora(fixtures_dir: Path, filename: str) -> None:
    assert inspect_lora(read_safetensors_header(fixtures_dir / "embeddings" / filename)) is None


def test_diffusers_embedding_and_empty_dicts_are_not_loras(fixtures_dir: Path) -> None:
    birb = load_state_dict(
        fixtures_dir / "embeddings" / "fastai_birb-style_learned_embeds.bin", max_bytes=MAX_BYTES
    )
    assert inspect_lora(birb) is None
    assert inspect_lora({}) is None
    assert inspect_lora({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}) is None


# --- kohya files made here ----------------------------------------------------------------------------------


def test_sd15_kohya_file_is_recognised_with_rank_alpha_and_parts(tmp_path: Path) -> None:
    layers = sd15_kohya_layers()
    path = save(tmp_path, "kohya.safetensors", kohya_state_dict(layers), {"ss_base_model_version": "sd_v1"})
    header = read_safetensors_header(path)
    info = inspect_lora(header)
    assert info is not None
    assert (info.format, info.family, info.details["rank"]) == ("kohya", Family.sd15, 4)
    assert info.details["layers"] == len(layers) == 16 * 11 + 1 + 12 * 6
    assert info.details["parts"] == ["text_encoder", "unet"]
    assert info.details["base_model_version"] == "sd_v1"
    with_values = inspect_lora(load_state_dict(path, max_bytes=MAX_BYTES), header.metadata)
    assert with_values is not None and with_values.details["alpha"] == 2.0


def test_pickled_kohya_file_is_recognised_from_its_tensors(tmp_path: Path) -> None:
    path = tmp_path / "kohya.pt"
    torch.save(kohya_state_dict(sd15_kohya_layers(), rank=8, alpha=8.0), path)
    info = inspect_lora(load_state_dict(path, max_bytes=MAX_BYTES))
    assert info is not None
    assert (info.format, info.family, info.details["rank"], info.details["alpha"]) == (
        "kohya",
        "sd15",
        8,
        8.0,
    )


def test_sdxl_kohya_file_is_sdxl_and_refused_on_sd15_by_name(tmp_path: Path) -> None:
    path = save(tmp_path, "xl.safetensors", kohya_state_dict(SDXL_KOHYA_LAYERS))
    header = read_safetensors_header(path)
    info = inspect_lora(header)
    assert info is not None and (info.format, info.family) == ("kohya", Family.sdxl)
    assert info.details["parts"] == ["text_encoder", "text_encoder_2", "unet"]
    with pytest.raises(InvalidRequestError) as refused:
        inspect_lora(header, expected=Family.sd15)
    assert str(refused.value) == "This LoRA is for SDXL; this server's model is SD 1.5."


def test_sd15_file_is_refused_on_sdxl_by_name() -> None:
    shapes = {k: tuple(v.shape) for k, v in kohya_state_dict(sd15_kohya_layers()).items()}
    with pytest.raises(InvalidRequestError) as refused:
        inspect_lora(shapes, expected="sdxl")
    assert str(refused.value) == "This LoRA is for SD 1.5; this server's model is SDXL."


def test_sdxl_sgm_names_map_to_the_diffusers_layers() -> None:
    prepared = prepare_lora(kohya_state_dict(SDXL_KOHYA_LAYERS), Family.sdxl)
    got = {(p.target.component, p.target.module) for p in prepared.peft}
    assert got == {
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v"),
        ("unet", "down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_q"),
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
        ("unet", "up_blocks.1.attentions.0.proj_in"),
        ("unet", "up_blocks.1.resnets.0.conv1"),
        ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
        ("text_encoder_2", "encoder.layers.31.mlp.fc1"),
    }


def test_sdxl_diffusers_style_kohya_names_are_sdxl_too() -> None:
    shapes = {
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_1_attn2_to_k.lora_down.weight": (4, 2048),
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_1_attn2_to_k.lora_up.weight": (640, 4),
    }
    info = inspect_lora(shapes)
    assert info is not None and info.family == Family.sdxl


def _shapes(layers: dict[str, tuple[int, int, tuple[int, int] | None]]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in kohya_state_dict(layers).items()}


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        # a width no SD 1.5 or SDXL layer of that name has
        (
            _shapes(
                {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (700, 320, None)}
            ),
            NO_FIT_MESSAGE,
        ),
        # a layer neither model has
        (_shapes({"lora_unet_down_blocks_7_attentions_0_proj_in": (320, 320, None)}), NO_FIT_MESSAGE),
        # SD 2.x: 1024-wide cross-attention
        (
            _shapes(
                {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (1024, 320, None)}
            ),
            SD2_MESSAGE,
        ),
        # an up weight whose rank does not match its down weight
        (
            {
                "lora_unet_conv_in.lora_down.weight": (4, 4, 3, 3),
                "lora_unet_conv_in.lora_up.weight": (320, 8, 1, 1),
            },
            BROKEN_MESSAGE,
        ),
        # a down weight without its up weight
        ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768)}, BROKEN_MESSAGE),
        # LoRA layers with a whole UNet weight beside them
        (
            {
                **_shapes({"lora_unet_conv_in": (4, 320, (3, 3))}),
                "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
            },
            FOREIGN_MESSAGE,
        ),
    ],
)
def test_bad_files_are_refused_in_one_sentence(shapes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        inspect_lora(shapes)
    assert str(refused.value) == message


def test_sd2_metadata_is_refused_even_where_shapes_fit_sd15() -> None:
    shapes = _shapes(
        {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320, None)}
    )
    assert inspect_lora(shapes) is not None
    with pytest.raises(InvalidRequestError, match="SD 2.x"):
        inspect_lora(shapes, {"ss_v2": "True"})


def _loha_layer(name: str, i: int, o: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{name}.hada_w1_a": torch.randn(o, rank, generator=gen) * 0.1,
        f"{name}.hada_w1_b": torch.randn(rank, i, generator=gen) * 0.1,
        f"{name}.hada_w2_a": torch.randn(o, rank, generator=gen) * 0.1,
        f"{name}.hada_w2_b": torch.randn(rank, i, generator=gen) * 0.1,
        f"{name}.alpha": torch.tensor(float(rank) / 2),
    }


def test_loha_and_unsupported_lycoris_layers_are_recognised() -> None:
    loha = _loha_layer("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v", 768, 1280, 8, 0)
    info = inspect_lora(loha)
    assert info is not None and (info.format, info.family, info.details["rank"]) == (
        "lycoris-loha",
        "sd15",
        8,
    )
    assert info.details["applicable"] is True
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tucker = {
        **_loha_layer(conv, 320, 320, 8, 1),
        f"{conv}.hada_t1": torch.zeros(8, 8, 3, 3),  # the 3x3 kernel lives in the cores
        f"{conv}.hada_t2": torch.zeros(8, 8, 3, 3),
    }
    info = inspect_lora(tucker)
    assert info is not None and (info.format, info.family) == ("lycoris-loha", "sd15")
    assert info.details["applicable"] is False
    with pytest.raises(InvalidRequestError, match="can't be applied yet; upload a standard LoRA"):
        prepare_lora(tucker, Family.sd15)


def test_tucker_locon_conv_layer_is_recognised_but_not_applicable() -> None:
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    shapes = {
        f"{name}.lora_down.weight": (4, 320, 1, 1),
        f"{name}.lora_mid.weight": (4, 4, 3, 3),  # the 3x3 kernel lives in the core
        f"{name}.lora_up.weight": (320, 4, 1, 1),
    }
    info = inspect_lora(shapes)
    assert info is not None and (info.format, info.family) == ("kohya", Family.sd15)
    assert info.details["applicable"] is False
    assert info.details["unsupported"] == "LoCon files with Tucker-decomposed layers"


def test_dora_file_is_recognised_but_not_applicable() -> None:
    sd = kohya_state_dict({"lora_unet_conv_in": (4, 320, (3, 3))})
    sd["lora_unet_conv_in.dora_scale"] = torch.ones(320, 1, 1, 1)
    info = inspect_lora(sd)
    assert (
        info is not None
        and info.details["applicable"] is False
        and info.details["unsupported"] == "DoRA files"
    )


# --- conversion ---------------------------------------------------------------------------------------------


def test_alpha_over_rank_is_folded_into_lora_b() -> None:
    sd = kohya_state_dict(
        {"lora_te_text_model_encoder_layers_3_mlp_fc2": (3072, 768, None)}, rank=4, alpha=2.0
    )
    (layer,) = prepare_lora(sd, Family.sd15).peft
    assert torch.equal(layer.lora_a, sd["lora_te_text_model_encoder_layers_3_mlp_fc2.lora_down.weight"])
    assert torch.allclose(
        layer.lora_b, sd["lora_te_text_model_encoder_layers_3_mlp_fc2.lora_up.weight"] * 0.5
    )


def test_conv_lora_keeps_its_kernel_and_1x1_gets_one() -> None:
    sd = kohya_state_dict(
        {
            "lora_unet_down_blocks_0_resnets_0_conv1": (320, 320, (3, 3)),
            "lora_unet_down_blocks_0_attentions_0_proj_out": (320, 320, None),
        }  # 2-D weights for a 1x1 conv
    )
    shapes = {
        p.target.module: (tuple(p.lora_a.shape), tuple(p.lora_b.shape)) for p in prepare_lora(sd, "sd15").peft
    }
    assert shapes == {
        "down_blocks.0.resnets.0.conv1": ((4, 320, 3, 3), (320, 4, 1, 1)),
        "down_blocks.0.attentions.0.proj_out": ((4, 320, 1, 1), (320, 4, 1, 1)),
    }


def test_peft_config_alpha_scales_a_peft_file(fixtures_dir: Path) -> None:
    sd = load_state_dict(
        fixtures_dir / "lora" / "sd15_text_encoder_adapter_model.safetensors", max_bytes=MAX_BYTES
    )
    plain = {p.target.module: p.lora_b for p in prepare_lora(sd, Family.sd15).peft}
    doubled = prepare_lora(sd, Family.sd15, peft_config_metadata({"r": 8, "lora_alpha": 16}))
    assert len(plain) == 24
    for layer in doubled.peft:
        assert layer.target.component == "text_encoder"
        assert torch.allclose(layer.lora_b, plain[layer.target.module] * 2)


def test_cloneofsimo_indices_follow_old_diffusers_module_order(fixtures_dir: Path) -> None:
    sd = load_state_dict(fixtures_dir / "lora" / "analog_svd_rank4.safetensors", max_bytes=MAX_BYTES)
    downs = {(k.split(":")[0], int(k.split(":")[1])): v.float() for k, v in sd.items() if k.endswith(":down")}
    targets = {}
    for layer in prepare_lora(sd, Family.sd15).peft:
        (index,) = [i for i, down in downs.items() if torch.equal(layer.lora_a, down)]
        targets[index] = (layer.target.component, layer.target.module)
    assert len(targets) == 192
    first = "down_blocks.0.attentions.0.transformer_blocks.0"
    # attn1 q k v out, then the GEGLU projection, then attn2 (old BasicTransformerBlock order)
    assert targets[("unet", 4)] == ("unet", f"{first}.ff.net.0.proj")
    assert targets[("unet", 6)] == ("unet", f"{first}.attn2.to_k")
    # down blocks, then up blocks, the middle block last
    assert targets[("unet", 54)] == ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert targets[("unet", 135)] == ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    # CLIPAttention registers k, v, q, out
    assert targets[("text_encoder", 2)] == ("text_encoder", "encoder.layers.0.self_attn.q_proj")
