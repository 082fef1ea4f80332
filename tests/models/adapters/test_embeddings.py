"""Tests for models.adapters.embeddings: real webui/diffusers files recognised, applied per job, restored."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from models.adapters.embeddings import (
    MAX_VECTORS,
    embedding_names_in,
    embedding_tokens,
    embedding_vectors,
    expand_embedding_words,
    file_short_hash,
    inspect_embedding,
    load_embeddings,
    unload_embeddings,
)
from models.adapters.safe_files import load_pickle_object, load_state_dict, sniff_format
from models.families import Family
from models.tiny import tiny_path
from models.tokenizer import load_clip_tokenizer
from storage.errors import InvalidRequestError
from storage.tables import AssetKind

pytestmark = pytest.mark.usefixtures("single_thread")

MAX_BYTES = 50 * 2**20
CLIP_VOCAB = 49408  # the CLIP BPE vocabulary: added tokens get ids from here on

#: file -> (asset name, format, vectors); the counts are those the fixtures README lists.
FIXTURES: dict[str, tuple[str, str, int]] = {
    "bad-artist.pt": ("bad-artist", "webui-pt", 2),
    "bad-artist-anime.pt": ("bad-artist-anime", "webui-pt", 2),
    "bad-hands-5.pt": ("bad-hands-5", "webui-pt", 2),
    "eyeliner2.pt": ("eyeliner2", "webui-pt", 3),
    "bad_prompt_version2.pt": ("bad_prompt_version2", "webui-pt", 8),
    "bad-prompt.pt": ("bad-prompt", "webui-pt", 16),
    "EasyNegative.safetensors": ("EasyNegative", "webui-safetensors", 8),
    "fastai_birb-style_learned_embeds.bin": ("birb-style", "diffusers", 1),
}


def _read(path: Path) -> Any:
    """A fixture as the asset store will read it: safetensors as tensors, torch pickles as plain objects."""
    if sniff_format(path) == "safetensors":
        return load_state_dict(path, max_bytes=MAX_BYTES)
    return load_pickle_object(path, max_bytes=MAX_BYTES)


def _raw_vectors(obj: Any) -> torch.Tensor:
    """The file's vectors read straight from its documented layout (not through the module under test)."""
    if "string_to_param" in obj:
        return obj["string_to_param"]["*"]
    tensor = next(iter(obj.values()))
    return tensor.reshape(-1, tensor.shape[-1])


def _gen() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(0)


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_models: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_path(tiny_models, "sdxl"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- recognising files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", sorted(FIXTURES))
def test_every_real_file_is_recognised(fixtures_dir: Path, filename: str) -> None:
    _, fmt, vectors = FIXTURES[filename]
    obj = _read(fixtures_dir / "embeddings" / filename)
    info = inspect_embedding(obj, {})
    assert info is not None
    assert (info.kind, info.format, info.family) == (AssetKind.EMBEDDING, fmt, Family.sd15)
    assert info.details["vectors"] == vectors and info.details["width"] == 768
    if fmt == "webui-pt":
        assert info.details["name"] == obj["name"] and info.details["step"] == obj["step"]
    if fmt == "diffusers":
        assert info.details["token"] == "<birb-style>"
    noun = "vector" if vectors == 1 else "vectors"
    assert info.describe() == f"embedding, {fmt} format, SD 1.5, {vectors} {noun}"
    got = embedding_vectors(obj, Family.sd15)
    assert list(got) == ["text_encoder"]
    assert got["text_encoder"].dtype == torch.float32
    assert torch.equal(got["text_encoder"], _raw_vectors(obj).float())


def test_sdxl_file_is_recognised_and_split_per_encoder() -> None:
    clip_l, clip_g = torch.randn(3, 768), torch.randn(3, 1280)
    info = inspect_embedding({"clip_l": clip_l, "clip_g": clip_g}, {"name": "y2k"})
    assert info is not None and (info.format, info.family) == ("sdxl", Family.sdxl)
    assert info.details == {"vectors": 3, "widths": {"clip_l": 768, "clip_g": 1280}, "name": "y2k"}
    got = embedding_vectors({"clip_l": clip_l, "clip_g": clip_g}, Family.sdxl)
    assert set(got) == {"text_encoder", "text_encoder_2"}
    assert torch.equal(got["text_encoder"], clip_l) and torch.equal(got["text_encoder_2"], clip_g)


@pytest.mark.parametrize(
    "obj",
    [
        {
            "lora_unet_down.lora_up.weight": torch.zeros(4, 4),
            "lora_unet_down.lora_down.weight": torch.zeros(4, 4),
        },
        {"conv.weight": torch.zeros(4, 4, 3, 3)},
        {"count": torch.tensor([1, 2, 3])},
        ["not", "a", "dict"],
        {},
    ],
)
def test_other_files_are_not_embeddings(obj: Any) -> None:
    assert inspect_embedding(obj, {}) is None


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        ({"emb_params": torch.zeros(2, 1024)}, "is for SD 2.x"),
        ({"string_to_param": {"*": torch.zeros(2, 1024)}, "name": "x"}, "is for SD 2.x"),
        ({"<tok>": torch.zeros(512)}, "512 wide"),
        ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, "different numbers of vectors"),
        ({"clip_l": torch.zeros(2, 1024), "clip_g": torch.zeros(2, 1280)}, "this one 1024 and 1280"),
        ({"string_to_param": {"*": torch.zeros(2, 768), "+": torch.zeros(1, 768)}}, "exactly one term"),
        ({"string_to_param": {"*": "text"}}, "not a list of vectors"),
        ({"emb_params": torch.zeros(MAX_VECTORS + 1, 768)}, "at most 75"),
        ({"emb_params": torch.full((2, 768), float("nan"))}, "NaN"),
    ],
)
def test_broken_or_foreign_embeddings_are_refused_in_one_sentence(obj: Any, words: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        inspect_embedding(obj, {})
    message = str(caught.value)
    assert words in message
    assert message.count(". ") == 0 and message.endswith(".") and "\n" not in message


def test_wrong_family_is_refused_naming_both() -> None:
    sdxl = {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}
    with pytest.raises(
        InvalidRequestError, match=r"^This embedding is for SDXL; this server's model is SD 1\.5\.$"
    ):
        embedding_vectors(sdxl, Family.sd15)
    with pytest.raises(
        InvalidRequestError, match=r"^This embedding is for SD 1\.5; this server's model is SDXL\.$"
    ):
        embedding_vectors({"emb_params": torch.zeros(2, 768)}, Family.sdxl)


def test_file_short_hash_is_the_webui_ti_hash(tmp_path: Path, fixtures_dir: Path) -> None:
    path = tmp_path / "abc.pt"
    path.write_bytes(b"abc")
    # sha256("abc"), the FIPS 180-2 test vector
    assert file_short_hash(path) == "ba7816bf8f01"
    assert file_short_hash(path, n=20) == "ba7816bf8f01cfea4141"
    easy = fixtures_dir / "embeddings" / "EasyNegative.safetensors"
    assert file_short_hash(easy) == hashlib.sha256(easy.read_bytes()).hexdigest()[:12]


# --- finding and expanding names in prompts ---------------------------------------------------------------

LOADED = {
    "EasyNegative": embedding_tokens("EasyNegative", 3),
    "bad-artist": embedding_tokens("bad-artist", 2),
    "bad-artist-anime": embedding_tokens("bad-artist-anime", 1),
}


def test_token_strings_follow_diffusers_multi_vector_naming() -> None:
    assert embedding_tokens("EasyNegative", 3) == ["<EasyNegative>", "<EasyNegative>_1", "<EasyNegative>_2"]
    assert embedding_tokens("birb", 1) == ["<birb>"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("EasyNegative", "{E}"),
        ("a cat, easynegative, EASYNEGATIVE", "a cat, {E}, {E}"),
        ("(EasyNegative:1.2)", "({E}:1.2)"),
        ("[EasyNegative|bad-artist]", "[{E}|{A}]"),
        ("ends with EasyNegative.", "ends with {E}."),
        ("bad-artist-anime and bad-artist", "{AA} and {A}"),
        ("EasyNegativeV2 EasyNegative_x my-EasyNegative EasyNegative-2 v.EasyNegative", None),
        ("bad-artists, bad-artist-animes, xbad-artist, <EasyNegative>", None),
        ("a red cube on a table", None),
    ],
)
def test_names_expand_as_whole_words_case_insensitively(text: str, expected: str | None) -> None:
    want = text
    if expected is not None:
        want = expected.format(
            E="<EasyNegative> <EasyNegative>_1 <EasyNegative>_2",
            A="<bad-artist> <bad-artist>_1",
            AA="<bad-artist-anime>",
        )
    assert expand_embedding_words(text, LOADED) == want


def test_expanding_twice_changes_nothing() -> None:
    once = expand_embedding_words("EasyNegative, bad-artist", LOADED)
    assert expand_embedding_words(once, LOADED) == once


def test_names_in_text_use_the_same_rule() -> None:
    names = list(LOADED)
    assert embedding_names_in("bad-artist-anime, easynegative, bad-artist, EasyNegative", names) == [
        "bad-artist-anime",
        "EasyNegative",
        "bad-artist",
    ]
    assert embedding_names_in("EasyNegativeV2, a bad artist", names) == []
    assert embedding_names_in("anything", []) == []
    assert expand_embedding_words("anything", {}) == "anything"


# --- applying on a pipeline, with the real CLIP tokenizer --------------------------------------------------


def _tokenizer_json(tok: Any) -> dict[str, Any]:
    """The tokenizer's whole definition, less the padding/truncation that transformers sets on each call."""
    definition: dict[str, Any] = json.loads(tok._tokenizer.to_str())
    definition.pop("padding")
    definition.pop("truncation")
    return definition


def _encoder_state(pipe: Any) -> tuple[Any, torch.Tensor, int, int, dict[str, Any]]:
    te, tok = pipe.text_encoder, pipe.tokenizer
    module = te.get_input_embeddings()
    return module, module.weight.detach().clone(), te.config.vocab_size, len(tok), _tokenizer_json(tok)


def _assert_restored(pipe: Any, before: tuple[Any, torch.Tensor, int, int, dict[str, Any]]) -> None:
    module, weight, vocab_size, length, tokenizer_json = before
    te, tok = pipe.text_encoder, pipe.tokenizer
    assert te.get_input_embeddings() is module
    assert torch.equal(te.get_input_embeddings().weight, weight)
    assert te.config.vocab_size == vocab_size and len(tok) == length
    assert _tokenizer_json(tok) == tokenizer_json


def test_expanded_text_tokenises_to_exactly_the_added_tokens(tiny_sd15: StableDiffusionPipeline) -> None:
    tok = tiny_sd15.tokenizer
    assert len(tok) == CLIP_VOCAB and tok.name_or_path  # the real CLIP tokenizer, nothing added yet
    reference = load_clip_tokenizer()
    plain = "a photo of a cat, EasyNegativeV2, bad artist, easy negative"
    before = tok(plain).input_ids
    vectors = {
        "EasyNegative": {"text_encoder": torch.randn(8, 32)},
        "birb": {"text_encoder": torch.randn(1, 32)},
    }
    with load_embeddings(tiny_sd15, Family.sd15, vectors) as loaded:
        assert dict(loaded) == {"EasyNegative": embedding_tokens("EasyNegative", 8), "birb": ["<birb>"]}
        ids = tok.convert_tokens_to_ids(loaded["EasyNegative"])
        assert ids == list(range(CLIP_VOCAB, CLIP_VOCAB + 8))
        text = expand_embedding_words("a cat, EasyNegative, (birb:1.1)", loaded)
        got = tok(text, add_special_tokens=False).input_ids
        assert got == reference("a cat,", add_special_tokens=False).input_ids + ids + [
            *reference(", (", add_special_tokens=False).input_ids,
            CLIP_VOCAB + 8,
            *reference(":1.1)", add_special_tokens=False).input_ids,
        ]
        # text without a loaded name tokenises exactly as before loading
        assert tok(plain).input_ids == before == reference(plain).input_ids
        # the tokenizer itself matches the added tokens case-insensitively (CLIP lower-cases the text)
        assert tok("<easynegative>_1", add_special_tokens=False).input_ids == [CLIP_VOCAB + 1]
        rows = tiny_sd15.text_encoder.get_input_embeddings().weight
        assert torch.equal(rows[CLIP_VOCAB : CLIP_VOCAB + 8], vectors["EasyNegative"]["text_encoder"])
        assert torch.equal(rows[CLIP_VOCAB + 8], vectors["birb"]["text_encoder"][0])
    assert tok(plain).input_ids == before and len(tok) == CLIP_VOCAB
    assert (
        tok(text, add_special_tokens=False).input_ids == reference(text, add_special_tokens=False).input_ids
    )


def test_restore_is_exact_and_a_plain_job_is_bit_identical(tiny_sd15: StableDiffusionPipeline) -> None:
    pipe = tiny_sd15

    def job() -> np.ndarray:
        return pipe(
            "a cat", num_inference_steps=1, height=64, width=64, generator=_gen(), output_type="np"
        ).images

    def encode(text: str) -> torch.Tensor:
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids).last_hidden_state

    state = _encoder_state(pipe)
    first, plain = job(), encode("a birb")
    vectors = {"birb": {"text_encoder": torch.randn(2, 32)}}
    rng = torch.get_rng_state()
    loaded = load_embeddings(pipe, Family.sd15, vectors)
    assert len(pipe.tokenizer) == CLIP_VOCAB + 2 and pipe.text_encoder.config.vocab_size == CLIP_VOCAB + 2
    prompt = expand_embedding_words("a birb", loaded)
    assert prompt == "a <birb> <birb>_1"
    assert not torch.equal(encode(prompt), plain)
    unload_embeddings(loaded)
    unload_embeddings(loaded)  # idempotent
    assert torch.equal(torch.get_rng_state(), rng)  # the thrown-away random rows left the global RNG alone
    _assert_restored(pipe, state)
    assert torch.equal(encode("a birb"), plain)
    assert np.array_equal(job(), first)


def test_refusals_change_nothing(tiny_sd15: StableDiffusionPipeline) -> None:
    state = _encoder_state(tiny_sd15)
    cases = [
        ({"EasyNegative": {"text_encoder": torch.zeros(8, 768)}}, "has 768-wide vectors but this model's"),
        ({"sd2": {"text_encoder": torch.zeros(2, 1024)}}, "is for SD 2.x"),
        (
            {"Foo": {"text_encoder": torch.zeros(1, 32)}, "foo": {"text_encoder": torch.zeros(1, 32)}},
            "only in case",
        ),
        ({"x": {"text_encoder": torch.zeros(1, 32), "text_encoder_2": torch.zeros(1, 32)}}, "text encoders"),
    ]
    for vectors, words in cases:
        with pytest.raises(InvalidRequestError, match=words):
            load_embeddings(tiny_sd15, Family.sd15, vectors)
        _assert_restored(tiny_sd15, state)


def test_loading_the_same_name_twice_is_a_bug_not_a_silent_overwrite(
    tiny_sd15: StableDiffusionPipeline,
) -> None:
    state = _encoder_state(tiny_sd15)
    with load_embeddings(tiny_sd15, Family.sd15, {"birb": {"text_encoder": torch.zeros(1, 32)}}):
        with pytest.raises(ValueError, match="already in the tokenizer"):
            load_embeddings(tiny_sd15, Family.sd15, {"birb": {"text_encoder": torch.ones(1, 32)}})
        assert torch.equal(tiny_sd15.text_encoder.get_input_embeddings().weight[CLIP_VOCAB], torch.zeros(32))
    _assert_restored(tiny_sd15, state)


def test_sdxl_embedding_goes_into_both_encoders_and_comes_out(tiny_sdxl: StableDiffusionXLPipeline) -> None:
    pipe = tiny_sdxl
    width_l = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    width_g = pipe.text_encoder_2.get_input_embeddings().weight.shape[1]
    obj = {"clip_l": torch.randn(2, width_l), "clip_g": torch.randn(2, width_g)}
    before_2 = pipe.text_encoder_2.get_input_embeddings().weight.detach().clone()
    state = _encoder_state(pipe)
    len_2 = len(pipe.tokenizer_2)

    def job() -> np.ndarray:
        return pipe(
            "a cat", num_inference_steps=1, height=64, width=64, generator=_gen(), output_type="np"
        ).images

    first = job()
    with load_embeddings(pipe, Family.sdxl, {"y2k": embedding_vectors(obj, Family.sdxl)}) as loaded:
        tokens = loaded["y2k"]
        ids_1 = pipe.tokenizer.convert_tokens_to_ids(tokens)
        ids_2 = pipe.tokenizer_2.convert_tokens_to_ids(tokens)
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids_1], obj["clip_l"])
        assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids_2], obj["clip_g"])
        text = expand_embedding_words("y2k style", loaded)
        # our conditioning maps tokenizer ids to tokenizer_2 ids through the token strings
        mapped = pipe.tokenizer_2.convert_tokens_to_ids(
            pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(text, add_special_tokens=False).input_ids)
        )
        assert mapped[:2] == ids_2
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False)
            plain, _, plain_pooled, _ = pipe.encode_prompt("y2k style", do_classifier_free_guidance=False)
        assert not torch.equal(embeds, plain) and not torch.equal(pooled, plain_pooled)
    _assert_restored(pipe, state)
    assert len(pipe.tokenizer_2) == len_2
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight, before_2)
    assert np.array_equal(job(), first)


def test_real_webui_files_change_the_reference_text_encoder(
    fixtures_dir: Path, sd15_reference: StableDiffusionPipeline
) -> None:
    pipe = sd15_reference
    state = _encoder_state(pipe)
    files = {name: _read(fixtures_dir / "embeddings" / f) for f, (name, _, _) in FIXTURES.items()}
    prompt = "a castle, " + ", ".join(files)

    def encode(text: str) -> torch.Tensor:
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids).last_hidden_state

    plain = encode(prompt)
    vectors = {name: embedding_vectors(obj, Family.sd15) for name, obj in files.items()}
    with load_embeddings(pipe, Family.sd15, vectors) as loaded:
        text = expand_embedding_words(prompt, loaded)
        ids = pipe.tokenizer(text).input_ids
        assert (
            len(ids)
            == 2
            + len(pipe.tokenizer("a castle, ", add_special_tokens=False).input_ids)
            + sum(v for _, _, v in FIXTURES.values())
            + len(files)
            - 1
        )  # the commas between the names
        rows = pipe.text_encoder.get_input_embeddings().weight
        for name, obj in files.items():
            assert torch.equal(
                rows[pipe.tokenizer.convert_tokens_to_ids(loaded[name])], _raw_vectors(obj).float()
            )
        assert not torch.equal(encode(text), plain)
    _assert_restored(pipe, state)
    assert torch.equal(encode(prompt), plain)


def test_width_1024_on_the_reference_model_is_refused(sd15_reference: StableDiffusionPipeline) -> None:
    with pytest.raises(InvalidRequestError, match=r"^This embedding is for SD 2\.x"):
        load_embeddings(sd15_reference, Family.sd15, {"sd2": {"text_encoder": torch.zeros(2, 1024)}})
    assert len(sd15_reference.tokenizer) == CLIP_VOCAB


def test_save_file_round_trip_of_an_sdxl_embedding(tmp_path: Path) -> None:
    path = tmp_path / "y2k.safetensors"
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(path))
    info = inspect_embedding(load_state_dict(path, max_bytes=MAX_BYTES), {})
    assert info is not None and info.family == Family.sdxl and info.details["vectors"] == 2
