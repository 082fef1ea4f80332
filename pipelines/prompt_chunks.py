"""Prompts as the text encoder sees them: the webui's 75-token chunks, and ``explain`` for users.

Chunking follows the webui's ``modules/sd_hijack_clip.py``; parsing is :mod:`pipelines.prompts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipelines.prompts import extract_networks, parse_attention, prompt_schedule
from storage.errors import InvalidRequestError

__all__ = [
    "CHUNK_LENGTH",
    "COMMA_BACKTRACK",
    "MAX_BREAKS",
    "MAX_WEIGHT",
    "Chunk",
    "check_prompt",
    "chunk_tokens",
    "explain",
]

#: Tokens per chunk, without the BOS/EOS the text encoder adds around each one (77 in all).
CHUNK_LENGTH = 75
#: When a chunk fills, text after a comma this close to its end moves to the next chunk (webui default).
COMMA_BACKTRACK = 20
#: Bounds the webui does not have, for prompts from strangers. Every BREAK opens another window that the
#: text encoder and each cross-attention layer pay for (a 4,000-character prompt of BREAKs is 667 windows,
#: 51,000 keys), and a weight beyond ±100 overflows float16 conditioning (1,000 nested "(" is 1.1**1000).
MAX_BREAKS = 32
MAX_WEIGHT = 100.0


@dataclass(frozen=True)
class Chunk:
    """One text-encoder window: ``CHUNK_LENGTH`` token ids and weights, without BOS/EOS.

    Positions from ``length`` on are padding (the tokenizer's EOS id, weight 1.0, as the webui pads);
    the encoder adds BOS before and EOS after (SDXL's second encoder pads after the first EOS).
    """

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    length: int


def chunk_tokens(
    weighted: list[tuple[str, float]], tokenizer: Any, embeddings: Mapping[int, int] | None = None
) -> list[Chunk]:
    """Tokenize attention runs into 75-token chunks, as the webui's ``tokenize_line``.

    When a chunk is full and a comma lies within its last ``COMMA_BACKTRACK`` tokens, the tokens after the
    comma move to the next chunk; ``("BREAK", -1.0)`` closes the chunk. An empty prompt gives one chunk.

    Args:
        weighted: :func:`parse_attention` output.
        tokenizer: A CLIP tokenizer (``models.tokenizer.load_clip_tokenizer()``).
        embeddings: The first token id of each loaded embedding -> its vector count; an embedding is never
            split across chunks (one that does not fit starts the next chunk), as in the webui.
    """
    groups = embeddings or {}
    texts = [text for text, _ in weighted]
    ids: list[list[int]] = tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    pad = int(tokenizer.eos_token_id)
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close(keep: int) -> None:
        nonlocal tokens, weights, last_comma
        real = tokens[:keep]
        fill = CHUNK_LENGTH - len(real)
        chunks.append(Chunk(tuple(real + [pad] * fill), tuple(weights[:keep] + [1.0] * fill), len(real)))
        tokens, weights, last_comma = tokens[keep:], weights[keep:], -1

    for run_ids, (text, weight) in zip(ids, weighted, strict=True):
        if text == "BREAK" and weight == -1:
            close(len(tokens))
            continue
        for token in run_ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_LENGTH and last_comma >= CHUNK_LENGTH - COMMA_BACKTRACK:
                close(last_comma + 1)
            if len(tokens) == CHUNK_LENGTH:
                close(CHUNK_LENGTH)
            if token in groups and len(tokens) + groups[token] > CHUNK_LENGTH:
                close(len(tokens))
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close(len(tokens))
    return chunks


def explain(text: str, steps: int = 20, tokenizer: Any = None) -> dict[str, Any]:
    """What the webui would make of a prompt, as JSON-ready data (for ``dreamcord explain-prompt``).

    Returns:
        ``weights``: the attention runs of the prompt without its network tags (``["BREAK", -1.0]`` for
        BREAK); ``schedule``: ``[until_step, text]`` pairs; ``networks``: ``{"type", "name", "weight"}``;
        ``chunks``/``tokens``: the most chunks and real tokens any scheduled text needs.
    """
    stripped, networks = extract_networks(text)
    schedule = prompt_schedule(stripped, steps)
    if tokenizer is None:
        from models.tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()
    sizes = {0: (0, 0)}
    for scheduled in {t for _, t in schedule}:
        chunks = chunk_tokens(parse_attention(scheduled), tokenizer)
        sizes[len(sizes)] = (len(chunks), sum(chunk.length for chunk in chunks))
    return {
        "weights": [[t, w] for t, w in parse_attention(stripped)],
        "schedule": [[step, t] for step, t in schedule],
        "networks": [{"type": net.type, "name": net.name, "weight": net.weight} for net in networks],
        "chunks": max(c for c, _ in sizes.values()),
        "tokens": max(t for _, t in sizes.values()),
    }


def check_prompt(text: str, steps: int, name: str = "prompt") -> None:
    """Refuse a prompt the webui would run but a shared bot should not (see :data:`MAX_BREAKS`).

    Every text the prompt takes over the steps is checked: at most :data:`MAX_BREAKS` BREAKs, and every
    attention weight within ±:data:`MAX_WEIGHT`. ``name`` is how the sentence calls it ("negative prompt").

    Raises:
        InvalidRequestError: one sentence; also anything :func:`extract_networks`, :func:`prompt_schedule`
            or :func:`parse_attention` refuses.
    """
    stripped, _ = extract_networks(text)
    for scheduled in dict.fromkeys(part for _, part in prompt_schedule(stripped, steps)):
        runs = parse_attention(scheduled)
        breaks = sum(1 for part, weight in runs if part == "BREAK" and weight == -1.0)
        if breaks > MAX_BREAKS:
            raise InvalidRequestError(f"The {name} has {breaks} BREAKs; use at most {MAX_BREAKS}.")
        worst = max(abs(weight) for _, weight in runs)
        if worst > MAX_WEIGHT:
            raise InvalidRequestError(
                f"An attention weight in the {name} comes to {worst:.4g}; keep weights between "
                f"-{MAX_WEIGHT:g} and {MAX_WEIGHT:g}, like (word:1.3)."
            )
