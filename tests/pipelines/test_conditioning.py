"""Webui-style conditioning on the tiny SD 1.5 and SDXL models: diffusers parity, weights, chunks, editing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from models.cache import LoadedModel, PipelineCache
from models.registry import ModelRegistry
from pipelines.conditioning import (
    ScheduledConditioning,
    encode_pair,
    encode_prompt,
    pipeline_kwargs,
)
from storage.errors import InvalidRequestError

CPU = torch.device("cpu")
SMALL: dict[str, Any] = {"width": 64, "height": 64, "num_inference_steps": 4, "output_type": "np"}
# 100 one-token words: the first chunk takes 75 of them, the second 25.
LONG = " ".join(["cat"] * 100)


@pytest.fixture(scope="module")
def cache(tiny_models: Any) -> PipelineCache:
    return PipelineCache(
        ModelRegistry(builtin_dir=tiny_models), device=CPU, dtype=torch.float32, budget_bytes=10**12
    )


@pytest.fixture(scope="module")
def sd15(cache: PipelineCache) -> LoadedModel:
    model = cache.get("tiny-sd15")
    model.base.set_progress_bar_config(disable=True)
    return model


@pytest.fixture(scope="module")
def sdxl(cache: PipelineCache) -> LoadedModel:
    model = cache.get("tiny-sdxl")
    model.base.set_progress_bar_config(disable=True)
    return model


def _generate(model: LoadedModel, batch: int = 1, **kwargs: Any) -> np.ndarray:
    generators = [torch.Generator("cpu").manual_seed(7 + i) for i in range(batch)]
    images: np.ndarray = model.base(generator=generators, **SMALL, **kwargs).images
    return images


def _n_tokens(model: LoadedModel, text: str) -> int:
    return len(model.base.tokenizer(text, add_special_tokens=False)["input_ids"])


# --- parity with diffusers' own encoding for plain prompts -------------------------------------------


def test_sd15_plain_prompt_equals_diffusers(sd15: LoadedModel) -> None:
    ref, ref_neg = sd15.base.encode_prompt("a red circle", CPU, 1, True, "blurry, ugly")
    pos, neg = encode_pair(sd15, "a red circle", "blurry, ugly")
    assert pos.embeds.shape == (1, 77, 32) and pos.pooled is None and pos.n_chunks == 1
    torch.testing.assert_close(pos.embeds, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(neg.embeds, ref_neg, atol=1e-5, rtol=0)


def test_sd15_clip_skip_2_uses_the_penultimate_layer_with_final_norm(sd15: LoadedModel) -> None:
    # diffusers' own clip_skip path reads text_encoder.text_model, which transformers 5 no longer has, so
    # the reference is built as diffusers and the webui describe it: hidden_states[-2], then final_layer_norm.
    encoder = sd15.base.text_encoder
    tokens = sd15.base.tokenizer("a red circle", padding="max_length", max_length=77, return_tensors="pt")
    ids = tokens.input_ids
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
        ref = encoder.final_layer_norm(out.hidden_states[-2])
    enc = encode_prompt(sd15, "a red circle", clip_skip=2)
    torch.testing.assert_close(enc.embeds, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(enc.embeds, encode_prompt(sd15, "a red circle").embeds, atol=1e-3)
    pos, neg = encode_pair(sd15, "a red circle", "blurry", clip_skip=2)  # the webui skips for both
    torch.testing.assert_close(neg.embeds, encode_prompt(sd15, "blurry", clip_skip=2).embeds)
    assert not torch.allclose(neg.embeds, encode_prompt(sd15, "blurry").embeds, atol=1e-3)


def test_sdxl_plain_prompt_equals_diffusers(sdxl: LoadedModel) -> None:
    ref, ref_neg, pooled, neg_pooled = sdxl.base.encode_prompt(
        prompt="a red circle", device=CPU, do_classifier_free_guidance=True, negative_prompt="blurry"
    )
    pos, neg = encode_pair(sdxl, "a red circle", "blurry")
    assert pos.embeds.shape == (1, 77, 64) and pos.pooled is not None and pos.pooled.shape == (1, 32)
    torch.testing.assert_close(pos.embeds, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(pos.pooled, pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(neg.embeds, ref_neg, atol=1e-5, rtol=0)
    assert neg.pooled is not None
    torch.testing.assert_close(neg.pooled, neg_pooled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_image_from_embeddings_equals_image_from_prompt(name: str, request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue(name)
    prompt, negative = "a red circle on blue", "blurry"
    by_text = _generate(model, 2, prompt=[prompt] * 2, negative_prompt=[negative] * 2)
    kwargs = pipeline_kwargs(model, prompt, negative, 2, 1)
    assert kwargs["prompt_embeds"].shape[0] == 2
    assert ("pooled_prompt_embeds" in kwargs) == (name == "sdxl")
    by_embeds = _generate(model, 2, **kwargs)
    assert by_text.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(by_embeds, by_text, atol=1e-5, rtol=0)


# --- attention weights ------------------------------------------------------------------------------


def test_weight_changes_only_its_positions_up_to_the_mean_rescale(sd15: LoadedModel) -> None:
    assert _n_tokens(sd15, "a red circle") == 3  # BOS, a, red, circle: "red" sits at position 2
    # The tiny encoder's final norm has a zero bias, so every position's mean is ~0 and the rescale would be
    # ~1; shift the bias (as trained encoders have) for the test, and put it back after.
    bias = sd15.base.text_encoder.final_layer_norm.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.add_(torch.linspace(0.1, 0.5, bias.numel()))
    try:
        plain = encode_prompt(sd15, "a red circle").embeds[0]
        weighted = encode_prompt(sd15, "a (red:1.5) circle").embeds[0]
        bracket = encode_prompt(sd15, "a (red) circle").embeds[0]
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    others = [i for i in range(77) if i != 2]
    # The best scale from the unchanged positions (least squares), then every position must fit it.
    c = float((weighted[others] * plain[others]).sum() / (plain[others] ** 2).sum())
    assert abs(c - 1) > 1e-4  # the rescale did something
    torch.testing.assert_close(weighted[others], c * plain[others], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weighted[2], 1.5 * c * plain[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weighted.mean(), plain.mean(), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(bracket, plain, atol=1e-5) and not torch.allclose(bracket, weighted, atol=1e-5)


def test_sdxl_weights_rescale_each_encoder_to_its_own_mean(sdxl: LoadedModel) -> None:
    plain = encode_prompt(sdxl, "a red circle")
    weighted = encode_prompt(sdxl, "a (red:1.5) circle")
    for half in (slice(0, 32), slice(32, 64)):
        p, w = plain.embeds[0, :, half], weighted.embeds[0, :, half]
        torch.testing.assert_close(w.mean(), p.mean(), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(w, p, atol=1e-4)
        c = (w[5:] / p[5:]).median()
        assert abs(float(c) - 1) > 1e-4  # the padding moved to restore the mean
        torch.testing.assert_close(w[5:], p[5:] * c, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(w[2], 1.5 * c * p[2], atol=1e-5, rtol=1e-4)
    assert plain.pooled is not None and weighted.pooled is not None
    torch.testing.assert_close(weighted.pooled, plain.pooled)  # the pooled output is not weighted


# --- chunks --------------------------------------------------------------------------------------------


def test_a_100_token_prompt_takes_two_chunks(sd15: LoadedModel) -> None:
    assert _n_tokens(sd15, LONG) == 100
    enc = encode_prompt(sd15, LONG)
    assert enc.n_chunks == 2 and enc.embeds.shape == (1, 154, 32)
    first, _ = sd15.base.encode_prompt(" ".join(["cat"] * 75), CPU, 1, False)
    second, _ = sd15.base.encode_prompt(" ".join(["cat"] * 25), CPU, 1, False)
    torch.testing.assert_close(enc.embeds[:, :77], first, atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.embeds[:, 77:], second, atol=1e-5, rtol=0)
    broken = encode_prompt(sd15, "cat BREAK dog")
    assert broken.n_chunks == 2
    torch.testing.assert_close(broken.embeds[:, 77:], encode_prompt(sd15, "dog").embeds)


def test_sdxl_long_prompt_pools_the_first_chunk(sdxl: LoadedModel) -> None:
    enc = encode_prompt(sdxl, LONG)
    assert enc.embeds.shape == (1, 154, 64)
    first, _, pooled, _ = sdxl.base.encode_prompt(
        prompt=" ".join(["cat"] * 75), device=CPU, do_classifier_free_guidance=False
    )
    torch.testing.assert_close(enc.embeds[:, :77], first, atol=1e-5, rtol=0)
    assert enc.pooled is not None
    torch.testing.assert_close(enc.pooled, pooled, atol=1e-5, rtol=0)


def test_the_shorter_prompt_is_padded_with_empty_chunks(sd15: LoadedModel) -> None:
    empty = encode_prompt(sd15, "").embeds
    short = encode_prompt(sd15, "blurry").embeds
    pos, neg = encode_pair(sd15, LONG, "blurry")
    assert pos.n_chunks == neg.n_chunks == 2 and neg.embeds.shape == (1, 154, 32)
    torch.testing.assert_close(neg.embeds[:, :77], short)
    torch.testing.assert_close(neg.embeds[:, 77:], empty)
    pos, neg = encode_pair(sd15, "blurry", LONG)
    assert pos.embeds.shape == neg.embeds.shape == (1, 154, 32)
    torch.testing.assert_close(pos.embeds[:, 77:], empty)
    padded = encode_prompt(sd15, "blurry", chunks=3)
    assert padded.n_chunks == 3 and padded.embeds.shape == (1, 231, 32)
    with pytest.raises(ValueError):
        encode_prompt(sd15, LONG, chunks=1)


def test_clip_skip_out_of_range_is_a_user_error(sd15: LoadedModel, sdxl: LoadedModel) -> None:
    with pytest.raises(InvalidRequestError, match="between 1 and 2"):
        encode_prompt(sd15, "x", clip_skip=3)
    with pytest.raises(InvalidRequestError, match="between 1 and 1"):
        encode_pair(sdxl, "x", "", clip_skip=2)
    with pytest.raises(InvalidRequestError):
        ScheduledConditioning(sd15, "x", "", 4, 1, clip_skip=0)


# --- prompt editing ------------------------------------------------------------------------------------


def _scheduled_image(model: LoadedModel, prompt: str, negative: str = "", **kwargs: Any) -> np.ndarray:
    sched = ScheduledConditioning(model, prompt, negative, 4, 1)
    return _generate(model, **sched.initial_kwargs(), **sched.callback_kwargs(), **kwargs)


def _swap_at_step_2(model: LoadedModel, cfg: bool) -> Any:
    """A hand-written reference: "cat" for steps 0-2, "dog" from step 3, as the webui's denoiser counts."""
    dog = pipeline_kwargs(model, "dog", "", 1)

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if step == 2:
            pos, neg = dog["prompt_embeds"], dog["negative_prompt_embeds"]
            kwargs["prompt_embeds"] = torch.cat([neg, pos]) if cfg else pos
            if "add_text_embeds" in kwargs:
                pos, neg = dog["pooled_prompt_embeds"], dog["negative_pooled_prompt_embeds"]
                kwargs["add_text_embeds"] = torch.cat([neg, pos]) if cfg else pos
        return kwargs

    return callback


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_prompt_editing_switches_mid_run(name: str, request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue(name)
    sched = ScheduledConditioning(model, "[cat:dog:0.5]", "", 4, 1)
    assert sched.is_scheduled and [sched.texts_at(i)[0] for i in range(4)] == ["cat", "cat", "cat", "dog"]
    # Only the last of 4 steps sees "dog": a strong guidance makes that step's share of the image visible.
    strong = {"guidance_scale": 20.0}
    cat = _generate(model, **pipeline_kwargs(model, "cat", "", 1), **strong)
    dog = _generate(model, **pipeline_kwargs(model, "dog", "", 1), **strong)
    edited = _scheduled_image(model, "[cat:dog:0.5]", **strong)
    assert np.abs(edited - cat).max() > 1e-4 and np.abs(edited - dog).max() > 1e-4
    tensors = ["prompt_embeds", "add_text_embeds"] if name == "sdxl" else ["prompt_embeds"]
    assert sched.tensor_inputs == tensors
    reference = _generate(
        model,
        **pipeline_kwargs(model, "cat", "", 1),
        callback_on_step_end=_swap_at_step_2(model, cfg=True),
        callback_on_step_end_tensor_inputs=tensors,
        **strong,
    )
    np.testing.assert_allclose(edited, reference, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_scheduled_image(model, "[cat:dog:4]", **strong), cat, atol=1e-5, rtol=0)


def test_prompt_editing_without_guidance_swaps_the_positive_only(sd15: LoadedModel) -> None:
    edited = _scheduled_image(sd15, "[cat:dog:0.5]", guidance_scale=1.0)
    reference = _generate(
        sd15,
        **pipeline_kwargs(sd15, "cat", "", 1),
        callback_on_step_end=_swap_at_step_2(sd15, cfg=False),
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        guidance_scale=1.0,
    )
    np.testing.assert_allclose(edited, reference, atol=1e-5, rtol=0)


def test_scheduled_texts_share_one_chunk_count_and_chain_callbacks(sd15: LoadedModel) -> None:
    sched = ScheduledConditioning(sd15, f"[{LONG}:dog:2]", "[blurry|ugly]", 4, 2)
    assert sched.n_chunks == 2
    assert [sched.texts_at(i) for i in range(4)] == [
        (LONG, "blurry"),
        (LONG, "blurry"),
        (LONG, "ugly"),
        ("dog", "blurry"),
    ]
    for text in (LONG, "dog", "blurry", "ugly"):
        assert sched.encoded(text).embeds.shape == (1, 154, 32)
    first = sched.initial_kwargs()
    assert first["prompt_embeds"].shape == first["negative_prompt_embeds"].shape == (2, 154, 32)
    steps: list[int] = []

    def record(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        steps.append(step)
        assert kwargs["prompt_embeds"].shape == (4, 154, 32)
        return kwargs

    images = _generate(sd15, 2, **first, **sched.callback_kwargs(then=record))
    # One call per timestep: PNDM (the tiny SD 1.5 default) runs 5 for 4 steps.
    assert steps == list(range(len(sd15.base.scheduler.timesteps))) and len(steps) >= 4
    assert images.shape == (2, 64, 64, 3)
    plain = ScheduledConditioning(sd15, "cat", "", 4, 1)
    assert not plain.is_scheduled and plain.n_chunks == 1
