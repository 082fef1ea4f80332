"""The webui prompt language: attention, prompt editing/alternation, extra networks, 75-token chunks.

Expected values come from the webui's own doctests (``modules/prompt_parser.py``) or are worked out by hand
from its rules in the comments beside them.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.prompt_chunks import CHUNK_LENGTH, chunk_tokens, explain
from pipelines.prompts import Network, extract_networks, parse_attention, prompt_schedule
from storage.errors import InvalidRequestError


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - a transformers CLIPTokenizer
    from models.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


def _ids(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------- attention

WEBUI_ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), WEBUI_ATTENTION)
def test_attention_matches_the_webui_doctests(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == expected


def test_attention_rules() -> None:
    assert parse_attention("((x))") == [("x", 1.1 * 1.1)]
    assert parse_attention("[x]") == [("x", 1 / 1.1)]
    assert parse_attention("[[x]]") == [("x", 1 / 1.1 / 1.1)]
    assert parse_attention("(x:-5)") == [("x", -5.0)]  # negative weights are allowed, as in the webui
    assert parse_attention("(x: 2 )") == [("x", 2.0)]
    assert parse_attention("[unclosed") == [("unclosed", 1 / 1.1)]
    # stray closers are literal text; a lone backslash disappears (the webui's token yields "")
    assert parse_attention("a) b] c") == [("a) b] c", 1.0)]
    assert parse_attention("a\\b") == [("ab", 1.0)]
    assert parse_attention("\\\\") == [("\\", 1.0)]
    # only digits and dots make a weight: "1e308" is text, the ')' then applies 1.1
    assert parse_attention("(x:1e308)") == [("x:1e308", 1.1)]
    assert parse_attention("") == [("", 1.0)]


def test_break_is_its_own_entry() -> None:
    assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_attention("aBREAK break") == [("aBREAK break", 1.0)]  # not a word of its own, lower case
    # inside brackets BREAK is multiplied like any run (so the chunker no longer sees a BREAK)
    assert parse_attention("(BREAK)") == [("", 1.1), ("BREAK", -1.1), ("", 1.1)]


@pytest.mark.parametrize("text", ["((x:" + "9" * 400 + "))", "(x:1.2.3)", "(x:.)"])
def test_bad_attention_weights_are_one_sentence(text: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_attention(text)
    message = str(caught.value)
    assert message.endswith(".") and message.count(". ") == 0 and "\n" not in message


def test_deep_and_long_prompts_are_fast() -> None:
    expected = 1.0
    for _ in range(1000):
        expected *= 1.1
    started = time.perf_counter()
    assert parse_attention("(" * 1000 + "x" + ")" * 1000) == [("x", expected)]
    assert prompt_schedule("[" * 1000 + "x" + "]" * 1000, 10) == [(10, "[" * 1000 + "x" + "]" * 1000)]
    assert prompt_schedule("[" * 1000 + "x", 10) == [(10, "[" * 1000 + "x")]
    long = "(a" * 5000 + "[b" * 5000 + " c" * 15_000  # 50,000 characters, nothing closed: quadratic there
    runs = parse_attention(long)
    assert len(runs) == 10_000 and runs[0] == ("a", 1.1)  # only the first '(' applies to the first run
    assert prompt_schedule(long, 20) == [(20, long)]
    with pytest.raises(InvalidRequestError):  # 1.1 ** 25,000 is not finite
        parse_attention("(a" * 25_000)
    assert prompt_schedule("[a:b:3]," * 6000, 20)[0] == (3, "a," * 6000)
    assert len(parse_attention("BREAK " * 8000)) == 2 * 8000 + 1
    assert time.perf_counter() - started < 20


def test_zero_width_and_rtl_characters_are_text() -> None:
    text = "a\u200bb (\u202eword\u200f) [x\u200d:y:2]"
    assert parse_attention(text)[1] == ("\u202eword\u200f", 1.1)
    kept = "a\u200bb (\u202eword\u200f) "
    assert prompt_schedule(text, 4) == [(2, kept + "x\u200d"), (4, kept + "y")]


# -------------------------------------------------------------------------------------- prompt schedule

WEBUI_SCHEDULES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
]


@pytest.mark.parametrize(("text", "expected"), WEBUI_SCHEDULES)
def test_schedule_matches_the_webui_doctests(text: str, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedule(text, 10) == expected


def test_schedule_stale_webui_doctest() -> None:
    # The webui's docstring ("not handling this right now") expects [[5, 'a  c'], [10, 'a {b|d{ c']], but
    # since '|' became alternation its grammar rejects this prompt ('|' and ':' in one bracket), and the
    # code keeps it whole; we follow the code.
    assert prompt_schedule("a [{b|d{:.5] c", 10) == [(10, "a [{b|d{:.5] c")]


def test_schedule_alternation_with_three_steps() -> None:
    assert prompt_schedule("[a|(b:1.1)]", 3) == [(1, "a"), (2, "(b:1.1)"), (3, "a")]


def test_schedule_hires_steps_as_the_webui() -> None:
    # webui doctests: with 10 base and 10 hires steps, fractions run 1.0..2.0 and integers count on from 10
    assert prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:13] c", 10, hires_steps=10) == [(3, "a  c"), (10, "a b c")]


def test_schedule_when_rules() -> None:
    # a '.' makes a fraction: int(0.25 * 20) = 5; "1.0" is the whole run, so the first part stays
    assert prompt_schedule("[a:b:0.25]", 20) == [(5, "a"), (20, "b")]
    assert prompt_schedule("[a:b:1.0]", 20) == [(20, "a")]
    # old timelines: below 1 a fraction, else a step number
    assert prompt_schedule("[a:b:1.0]", 20, old_scheduling=True) == [(1, "a"), (20, "b")]
    # step 0 or below never shows the first part; past the end it never switches
    assert prompt_schedule("[a:b:0]", 20) == [(20, "b")]
    assert prompt_schedule("[a:b:-3]", 20) == [(20, "b")]
    assert prompt_schedule("[a:b:99]", 20) == [(20, "a")]
    assert prompt_schedule("[from::5] x", 10) == [(5, "from x"), (10, " x")]
    assert prompt_schedule("[a:b:1e3]", 10) == [(10, "a")]


def test_schedule_nesting_and_strays() -> None:
    # the inner edit is the outer edit's "to" part
    assert prompt_schedule("[[a:3]:5]", 10) == [(3, ""), (5, ""), (10, "a")]
    # an unclosed '[' is literal and the edit after it still works
    assert prompt_schedule("[a:[b:3]", 10) == [(3, "[a:"), (10, "[a:b")]
    assert prompt_schedule("[a|b]]", 2) == [(1, "a]"), (2, "b]")]
    assert prompt_schedule("[a:(b:1):3]", 10) == [(3, "a"), (10, "(b:1)")]
    # three colons or a bad number: no edit, the text is kept
    assert prompt_schedule("[a:b:c:3]", 10) == [(10, "[a:b:c:3]")]
    assert prompt_schedule("[a:b:x]", 10) == [(10, "[a:b:x]")]


@pytest.mark.parametrize("text", ["a | b [c:2]", "[a:2] trailing\\", "[a:2] \\\n"])
def test_schedule_grammar_failures_keep_the_prompt(text: str) -> None:
    assert prompt_schedule(text, 10) == [(10, text)]


def test_schedule_rejects_bad_steps() -> None:
    with pytest.raises(InvalidRequestError):
        prompt_schedule("a", 0)
    with pytest.raises(InvalidRequestError, match="too large"):
        prompt_schedule("[a:b:1e999]", 10)


# ---------------------------------------------------------------------------------------- extra networks


def test_extract_networks() -> None:
    text, nets = extract_networks("<lora:foo:0.7> a cat <hypernet:bar>, <lyco:baz:0.5:0.25>")
    assert text == " a cat , "
    assert nets == [
        Network("lora", "foo", 0.7, 0.7, 0.7),
        Network("hypernet", "bar", 1.0, 1.0, 1.0),
        Network("lora", "baz", 0.5, 0.5, 0.25),
    ]
    _, (net,) = extract_networks("<lora:x:te=0.5:unet=1>")
    assert net == Network("lora", "x", 1.0, 0.5, 1.0)
    _, (net,) = extract_networks("<lora:x:0.8:te=0.3>")  # unet follows te when not given
    assert net == Network("lora", "x", 0.8, 0.3, 0.3)


def test_unclosed_tag_is_text() -> None:
    assert extract_networks("a <lora:foo:1 and more") == ("a <lora:foo:1 and more", [])
    assert extract_networks("a <> b < c") == ("a <> b < c", [])


@pytest.mark.parametrize("tag", ["<lora:x:abc>", "<lora:x:inf>", "<lora:x:1:nan>", "<lora::1>", "<foo:x:1>"])
def test_bad_network_tags(tag: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        extract_networks(f"a {tag} b")
    message = str(caught.value)
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message


# ------------------------------------------------------------------------------------------------ chunks


def test_hundred_tokens_make_two_chunks(tokenizer) -> None:  # noqa: ANN001
    text = "cat " * 100
    assert len(_ids(tokenizer, text)) == 100
    chunks = chunk_tokens([(text, 1.0), ("dog", 1.1)], tokenizer)
    assert [c.length for c in chunks] == [75, 26]
    assert all(len(c.tokens) == len(c.weights) == CHUNK_LENGTH for c in chunks)
    cat, dog = _ids(tokenizer, "cat")[0], _ids(tokenizer, "dog")[0]
    assert chunks[0].tokens == (cat,) * 75
    assert chunks[1].tokens[:26] == (cat,) * 25 + (dog,)
    assert chunks[1].tokens[26:] == (tokenizer.eos_token_id,) * 49
    assert chunks[1].weights[24:27] == (1.0, 1.1, 1.0)


def test_comma_near_the_end_moves_the_rest(tokenizer) -> None:  # noqa: ANN001
    comma = _ids(tokenizer, ",")[0]
    text = "cat " * 70 + ", " + "dog " * 10  # the comma is token 70: 75 - 70 <= 20
    chunks = chunk_tokens([(text, 1.0)], tokenizer)
    assert [c.length for c in chunks] == [71, 10]
    assert chunks[0].tokens[70] == comma
    far = "cat " * 50 + ", " + "dog " * 30  # the comma is token 50: 25 back, too far
    assert [c.length for c in chunk_tokens([(far, 1.0)], tokenizer)] == [75, 6]


def test_an_embedding_is_never_split_across_chunks(tokenizer) -> None:  # noqa: ANN001
    """As the webui: an embedding that does not fit the chunk's rest starts the next chunk."""
    from transformers import CLIPTokenizer

    from models.tokenizer import clip_tokenizer_dir

    tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), local_files_only=True)
    names = ["<emb>", "<emb>_1", "<emb>_2"]
    tok.add_tokens(names)
    first = tok.convert_tokens_to_ids(names[0])
    text = "cat " * 73 + " ".join(names) + " dog"
    assert len(_ids(tok, text)) == 77
    whole = chunk_tokens([(text, 1.0)], tok, {first: 3})
    assert [c.length for c in whole] == [73, 4]
    assert whole[1].tokens[:3] == tuple(tok.convert_tokens_to_ids(names))
    split = chunk_tokens([(text, 1.0)], tok)  # without knowing the embedding: cut after 75 tokens
    assert [c.length for c in split] == [75, 2]


def test_break_pads_the_chunk(tokenizer) -> None:  # noqa: ANN001
    chunks = chunk_tokens(parse_attention("cat BREAK (dog)"), tokenizer)
    assert [c.length for c in chunks] == [1, 1]
    assert chunks[0].tokens[1:] == (tokenizer.eos_token_id,) * 74
    assert chunks[1].weights[0] == 1.1
    assert len(chunk_tokens(parse_attention("BREAK BREAK"), tokenizer)) == 2
    assert [c.length for c in chunk_tokens(parse_attention(""), tokenizer)] == [0]


def test_explain(tokenizer) -> None:  # noqa: ANN001
    report = explain("<lora:foo:0.5> a (cat) [dog:bird:0.5] BREAK sky", steps=10, tokenizer=tokenizer)
    assert report["weights"][:3] == [[" a ", 1.0], ["cat", 1.1], [" ", 1.0]]
    assert ["BREAK", -1.0] in report["weights"]
    assert report["schedule"] == [[5, " a (cat) dog BREAK sky"], [10, " a (cat) bird BREAK sky"]]
    assert report["networks"] == [{"type": "lora", "name": "foo", "weight": 0.5}]
    assert report["chunks"] == 2
    assert report["tokens"] == len(_ids(tokenizer, " a cat dog")) + len(_ids(tokenizer, "sky"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list("()[]:|\\ ,abc0.5<>") + ["BREAK"]), max_size=40).map("".join))
def test_random_prompts_raise_only_invalid_request(text: str) -> None:
    try:
        stripped, _ = extract_networks(text)
        parse_attention(stripped)
        schedule = prompt_schedule(stripped, 7)
    except InvalidRequestError:
        return
    assert schedule[-1][0] == 7 and all(a < b for (a, _), (b, _) in zip(schedule, schedule[1:], strict=False))
