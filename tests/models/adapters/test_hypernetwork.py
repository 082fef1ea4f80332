"""Tests for models.adapters.hypernetwork: webui-format files made here, checked, applied, restored.

No real webui hypernetwork small enough was found (see ../shared/fixtures/README.md), so the files are made
here the way the webui saves them: ``torch.save`` of a dict keyed by context width whose values are
``(state_dict_k, state_dict_v)`` of hand-built Sequentials with the webui's layer order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from models.adapters.hypernetwork import (
    HypernetworkAttnProcessor,
    apply_hypernetworks,
    inspect_hypernetwork,
    load_hypernetwork,
)
from models.adapters.safe_files import load_pickle_object
from models.families import Family
from storage.errors import InvalidRequestError
from storage.tables import AssetKind

pytestmark = pytest.mark.usefixtures("single_thread")

SD15_WIDTHS = (768, 320, 640, 1280)
MAX_BYTES = 400 * 2**20

# --- the webui's layer orders, written out by hand --------------------------------------------------------


def plain_mlp(d: int) -> nn.Sequential:
    """[1, 2, 1], activation "linear", no layer norm, no dropout: the webui's default file."""
    return nn.Sequential(nn.Linear(d, 2 * d), nn.Linear(2 * d, d))


def deep_mlp(d: int) -> nn.Sequential:
    """[1, 2, 2, 1], relu, layer norm, use_dropout and last_layer_dropout, activate_output False.

    The webui's parse_dropout_structure gives [0, 0.3, 0.3, 0], so: Linear ReLU LayerNorm Dropout, Linear
    ReLU LayerNorm Dropout, Linear LayerNorm (no activation on the output layer).
    """
    return nn.Sequential(
        nn.Linear(d, 2 * d),
        nn.ReLU(),
        nn.LayerNorm(2 * d),
        nn.Dropout(0.3),
        nn.Linear(2 * d, 2 * d),
        nn.ReLU(),
        nn.LayerNorm(2 * d),
        nn.Dropout(0.3),
        nn.Linear(2 * d, d),
        nn.LayerNorm(d),
    )


def tanh_mlp(d: int) -> nn.Sequential:
    """[1, 2, 1], tanh, dropout_structure [0, 0.1, 0], activate_output: Linear Tanh Dropout Linear Tanh."""
    return nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Dropout(0.1), nn.Linear(2 * d, d), nn.Tanh())


SETTINGS: dict[Callable[[int], nn.Sequential], dict[str, Any]] = {
    plain_mlp: {"layer_structure": [1, 2, 1], "activation_func": "linear", "is_layer_norm": False},
    deep_mlp: {
        "layer_structure": [1, 2, 2, 1],
        "activation_func": "relu",
        "is_layer_norm": True,
        "use_dropout": True,
        "last_layer_dropout": True,
        "activate_output": False,
    },
    tanh_mlp: {
        "layer_structure": [1, 2, 1],
        "activation_func": "tanh",
        "is_layer_norm": False,
        "use_dropout": True,
        "dropout_structure": [0, 0.1, 0],
        "activate_output": True,
    },
}


def make_mlps(
    make: Callable[[int], nn.Sequential], widths: tuple[int, ...], std: float, seed: int
) -> dict[int, tuple[nn.Sequential, nn.Sequential]]:
    torch.manual_seed(seed)
    mlps = {}
    for width in widths:
        pair = (make(width).eval(), make(width).eval())
        for mlp in pair:
            for p in mlp.parameters():
                nn.init.normal_(p, std=std)
        mlps[width] = pair
    return mlps


def webui_dict(
    make: Callable[[int], nn.Sequential],
    widths: tuple[int, ...] = SD15_WIDTHS,
    *,
    std: float = 0.05,
    seed: int = 0,
    old_keys: bool = False,
) -> tuple[dict[Any, Any], dict[int, tuple[nn.Sequential, nn.Sequential]]]:
    """The dict the webui saves, and the hand-built MLPs it holds (for computing expected outputs)."""
    mlps = make_mlps(make, widths, std, seed)
    obj: dict[Any, Any] = {}
    for width, (k, v) in mlps.items():
        states = [{f"linear.{key}": t.clone() for key, t in m.state_dict().items()} for m in (k, v)]
        if old_keys:  # files from before the Sequential: linear1/linear2
            states = [{f"linear{int(key[7]) + 1}.{key[9:]}": t for key, t in s.items()} for s in states]
        obj[width] = tuple(states)
    obj.update(SETTINGS[make], name="test-hn", step=1234, sd_checkpoint=None, sd_checkpoint_name=None)
    return obj, mlps


def save_and_read(obj: dict[Any, Any], path: Path) -> Any:
    torch.save(obj, path)
    return load_pickle_object(path, max_bytes=MAX_BYTES)


# --- recognising and validating files ---------------------------------------------------------------------


@pytest.mark.parametrize("make", [plain_mlp, deep_mlp, tanh_mlp])
def test_real_format_files_are_recognised(tmp_path: Path, make: Callable[[int], nn.Sequential]) -> None:
    obj = save_and_read(webui_dict(make, std=0.01)[0], tmp_path / "hn.pt")
    info = inspect_hypernetwork(obj)
    assert info is not None
    assert (info.kind, info.format, info.family) == (AssetKind.HYPERNETWORK, "webui", Family.sd15)
    settings = SETTINGS[make]
    assert info.details["widths"] == sorted(SD15_WIDTHS)
    assert info.details["layer_structure"] == settings["layer_structure"]
    assert info.details["activation"] == settings["activation_func"]
    assert info.details["layer_norm"] is settings["is_layer_norm"]
    assert info.details["name"] == "test-hn" and info.details["step"] == 1234
    expected_dropout = {plain_mlp: False, deep_mlp: [0, 0.3, 0.3, 0], tanh_mlp: [0, 0.1, 0]}[make]
    assert info.details["dropout"] == expected_dropout
    assert info.describe() == "hypernetwork, webui format, SD 1.5"


def test_old_linear1_keys_are_mapped_as_the_webui_does(tmp_path: Path) -> None:
    obj, mlps = webui_dict(plain_mlp, (768,), old_keys=True)
    read = save_and_read(obj, tmp_path / "old.pt")
    assert set(read[768][0]) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    assert inspect_hypernetwork(read) is not None
    hn = load_hypernetwork(read)
    x = torch.randn(2, 5, 768)
    expected = x + mlps[768][0](x)
    assert torch.allclose(hn.layers[768][0](x), expected, atol=1e-6)


def test_defaults_of_a_bare_file_are_the_webuis(tmp_path: Path) -> None:
    """A file with only the layers: layer_structure [1, 2, 1], no activation, activate_output irrelevant."""
    obj, mlps = webui_dict(plain_mlp, (320,))
    bare = {320: obj[320]}
    hn = load_hypernetwork(save_and_read(bare, tmp_path / "bare.pt"), name="bare")
    assert hn.name == "bare" and hn.step is None and hn.widths == [320]
    x = torch.randn(1, 3, 320)
    assert torch.allclose(hn.layers[320][1](x, 0.5), x + 0.5 * mlps[320][1](x), atol=1e-6)


def test_loaded_modules_compute_the_webui_formula_in_eval_mode(tmp_path: Path) -> None:
    obj, mlps = webui_dict(deep_mlp, (640,), std=0.2)
    hn = load_hypernetwork(save_and_read(obj, tmp_path / "deep.pt"))
    assert hn.name == "test-hn" and hn.step == 1234
    module = hn.layers[640][1]
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    x = torch.randn(2, 7, 640)
    out = module(x, 0.7)
    assert torch.allclose(out, x + mlps[640][1](x) * 0.7, atol=1e-5)
    assert torch.equal(module(x, 0.7), out)  # dropout is off: deterministic


def _with(obj: dict[Any, Any], **changes: Any) -> dict[Any, Any]:
    return {**obj, **changes}


def _bad_width(obj: dict[Any, Any]) -> dict[Any, Any]:
    k, v = obj[768]
    k = dict(k)
    k["linear.0.weight"] = torch.zeros(1536, 700)
    return obj | {768: (k, v)}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_bad_width, "a layer for width 768 has the wrong shape"),
        (lambda o: _with(o, activation_func="foo"), "activation function 'foo', which is not supported"),
        (lambda o: _with(o, activation_func="threshold"), "activation function 'threshold'"),
        (lambda o: _with(o, activation_func=3), "activation function is not a name"),
        (lambda o: _with(o, layer_structure=[2, 1]), "must start and end with 1"),
        (lambda o: _with(o, layer_structure="1,2,1"), "not a list of numbers"),
        (lambda o: _with(o, layer_structure=[1, 1000, 1]), "size out of range"),
        (lambda o: _with(o, is_layer_norm=True), "do not match its layer structure"),
        (lambda o: _with(o, dropout_structure=[0, 1.5, 0]), "dropout structure does not fit"),
        (lambda o: _with(o, use_dropout="yes"), "use_dropout setting is not true or false"),
        (lambda o: o | {768: o[768][0]}, "not a key and value pair"),
        (lambda o: o | {768: ({"linear.0.weight": "x"}, o[768][1])}, "not plain weights"),
        (lambda o: o | {1024: o[768]}, "is for SD 2.x"),
        (lambda o: o | {2048: o[768]}, "is for SDXL"),
        (lambda o: {500: o[768], "layer_structure": [1, 2, 1]}, "width 500, which no SD 1.5 attention"),
        (lambda o: {768: o[320]}, "a layer for width 768 has the wrong shape"),
    ],
)
def test_malformed_files_are_refused_in_one_sentence(
    tmp_path: Path, change: Callable[[dict[Any, Any]], dict[Any, Any]], words: str
) -> None:
    obj = save_and_read(change(webui_dict(plain_mlp, (768, 320), std=0.01)[0]), tmp_path / "bad.pt")
    with pytest.raises(InvalidRequestError) as caught:
        inspect_hypernetwork(obj)
    message = str(caught.value)
    assert words in message and message.endswith(".") and "\n" not in message
    assert message.count(". ") == 0


def test_other_width_with_matching_layers_is_refused_for_sd15() -> None:
    obj, _ = webui_dict(plain_mlp, (500,), std=0.01)
    with pytest.raises(InvalidRequestError, match="width 500, which no SD 1.5 attention layer has"):
        inspect_hypernetwork(obj)
    assert load_hypernetwork(obj).widths == [500]  # building does not judge the family


def test_impossible_width_is_refused_when_building() -> None:
    obj, _ = webui_dict(plain_mlp, (64,), std=0.01)
    with pytest.raises(InvalidRequestError, match="impossible width 100000"):
        load_hypernetwork(obj | {100_000: obj[64]})


def test_activation_that_changes_the_width_is_refused() -> None:
    """GLU halves its input: the webui would build the file and crash at the first image."""
    obj = {64: ({}, {}), "layer_structure": [1, 2, 1], "activation_func": "glu", "activate_output": False}
    sizes = {"linear.0.weight": (128, 64), "linear.0.bias": (128,), "linear.2.weight": (64, 128)}
    state = {k: torch.zeros(s) for k, s in sizes.items()} | {"linear.2.bias": torch.zeros(64)}
    obj[64] = (state, dict(state))
    with pytest.raises(InvalidRequestError, match="cannot be chained"):
        load_hypernetwork(obj)


@pytest.mark.parametrize(
    "obj", [{"a.weight": torch.zeros(2)}, [1, 2], {"layer_structure": [1, 2, 1]}, {True: 1}]
)
def test_other_objects_are_not_hypernetworks(obj: Any) -> None:
    assert inspect_hypernetwork(obj) is None


# --- the attention processor against a hand computation --------------------------------------------------


def _attention_by_hand(
    attn: Attention, x: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor
) -> torch.Tensor:
    heads = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(ctx_k), attn.to_v(ctx_v)
    b, n, inner = q.shape
    d = inner // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, -1, heads, d).permute(0, 2, 1, 3)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ split(v)).permute(0, 2, 1, 3).reshape(b, n, inner)
    return attn.to_out[0](out)


def test_cross_attention_matches_the_formula_with_two_hypernetworks_in_sequence() -> None:
    torch.manual_seed(1)
    attn = Attention(query_dim=320, cross_attention_dim=768, heads=8, dim_head=40).eval()
    first, first_mlps = webui_dict(plain_mlp, (768, 320), std=0.1, seed=2)
    second, second_mlps = webui_dict(deep_mlp, (768,), std=0.1, seed=3)
    hn1, hn2 = load_hypernetwork(first), load_hypernetwork(second)
    x, ctx = torch.randn(2, 16, 320), torch.randn(2, 77, 768)
    attn.set_processor(HypernetworkAttnProcessor([(hn1, 0.8), (hn2, 0.5)]))
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=ctx)
        k1 = ctx + first_mlps[768][0](ctx) * 0.8
        v1 = ctx + first_mlps[768][1](ctx) * 0.8
        ctx_k = k1 + second_mlps[768][0](k1) * 0.5
        ctx_v = v1 + second_mlps[768][1](v1) * 0.5
        expected = _attention_by_hand(attn, x, ctx_k, ctx_v)
        plain = _attention_by_hand(attn, x, ctx, ctx)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_self_attention_uses_the_hidden_states_width() -> None:
    torch.manual_seed(4)
    attn = Attention(query_dim=320, heads=8, dim_head=40).eval()
    obj, mlps = webui_dict(tanh_mlp, (320,), std=0.1, seed=5)
    attn.set_processor(HypernetworkAttnProcessor([(load_hypernetwork(obj), 1.0)]))
    x = torch.randn(1, 64, 320)
    with torch.no_grad():
        expected = _attention_by_hand(attn, x, x + mlps[320][0](x), x + mlps[320][1](x))
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_strength_zero_is_bit_identical_to_no_hypernetwork() -> None:
    torch.manual_seed(6)
    attn = Attention(query_dim=320, cross_attention_dim=768, heads=8, dim_head=40).eval()
    hn = load_hypernetwork(webui_dict(deep_mlp, (768,), std=0.3)[0])
    x, ctx = torch.randn(2, 16, 320), torch.randn(2, 77, 768)
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        plain = attn(x, encoder_hidden_states=ctx)
        attn.set_processor(HypernetworkAttnProcessor([(hn, 0.0)]))
        assert torch.equal(attn(x, encoder_hidden_states=ctx), plain)
        attn.set_processor(HypernetworkAttnProcessor([(hn, 1.0)]))
        assert not torch.equal(attn(x, encoder_hidden_states=ctx), plain)


# --- on whole UNets: which layers, and the exact restore ---------------------------------------------------


def _latents(pipe: StableDiffusionPipeline) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(0)
    out = pipe("a cat", num_inference_steps=1, height=64, width=64, generator=generator, output_type="latent")
    return out.images


def test_tiny_unet_apply_and_restore(tiny_sd15: StableDiffusionPipeline) -> None:
    unet = tiny_sd15.unet
    original = dict(unet.attn_processors)
    before = _latents(tiny_sd15)
    hn = load_hypernetwork(webui_dict(plain_mlp, (32, 64), std=0.3)[0])  # tiny widths: cross 32, self 64
    with apply_hypernetworks(unet, [(hn, 1.0)]) as handle:
        assert all(isinstance(p, HypernetworkAttnProcessor) for p in unet.attn_processors.values())
        during = _latents(tiny_sd15)
    handle.restore()  # idempotent after the with block
    after = dict(unet.attn_processors)
    assert after.keys() == original.keys() and all(after[k] is original[k] for k in original)
    assert not torch.equal(during, before)
    assert torch.equal(_latents(tiny_sd15), before)


def test_only_layers_of_the_files_widths_change(tiny_sd15: StableDiffusionPipeline) -> None:
    unet = tiny_sd15.unet
    hn = load_hypernetwork(webui_dict(plain_mlp, (32,), std=0.3)[0])
    with apply_hypernetworks(unet, [(hn, 1.0)]):
        changed = {k for k, p in unet.attn_processors.items() if isinstance(p, HypernetworkAttnProcessor)}
    assert changed and all(k.endswith("attn2.processor") for k in changed)  # cross-attention only
    assert len(changed) == sum(k.endswith("attn2.processor") for k in unet.attn_processors)


def test_refusals_on_a_unet_leave_it_alone(tiny_sd15: StableDiffusionPipeline) -> None:
    unet = tiny_sd15.unet
    original = dict(unet.attn_processors)
    sd15_file = load_hypernetwork(webui_dict(plain_mlp, (768,), std=0.01)[0])
    with pytest.raises(InvalidRequestError, match="no layer that fits this model"):
        apply_hypernetworks(unet, [(sd15_file, 1.0)])
    name = next(k for k in original if k.endswith("attn2.processor"))
    custom = dict(original) | {name: type("CustomProcessor", (AttnProcessor2_0,), {})()}
    unet.set_attn_processor(dict(custom))
    try:
        with pytest.raises(InvalidRequestError, match="attention layers are customised"):
            apply_hypernetworks(unet, [(load_hypernetwork(webui_dict(plain_mlp, (32,))[0]), 1.0)])
    finally:
        unet.set_attn_processor(dict(original))
    assert all(unet.attn_processors[k] is original[k] for k in original)
    with apply_hypernetworks(unet, []):
        assert all(unet.attn_processors[k] is original[k] for k in original)


def test_reference_model_one_step_changes_and_restores(
    tmp_path: Path, sd15_reference: StableDiffusionPipeline
) -> None:
    pipe = sd15_reference
    unet = pipe.unet
    original = dict(unet.attn_processors)
    assert len(original) == 32  # SD 1.5: 16 transformer blocks, self- and cross-attention each
    obj = save_and_read(webui_dict(plain_mlp, std=0.02)[0], tmp_path / "sd15.pt")
    assert inspect_hypernetwork(obj) is not None
    hn = load_hypernetwork(obj)
    before = _latents(pipe)
    with apply_hypernetworks(unet, [(hn, 1.0)]):
        assert all(isinstance(p, HypernetworkAttnProcessor) for p in unet.attn_processors.values())
        during = _latents(pipe)
    assert all(unet.attn_processors[k] is original[k] for k in original)
    assert not torch.equal(during, before)
    assert torch.equal(_latents(pipe), before)
