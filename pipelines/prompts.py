"""The AUTOMATIC1111 prompt language: attention, prompt editing, alternation and extra networks.

Our own implementation of the webui's semantics (``parse_prompt_attention`` and
``get_learned_conditioning_prompt_schedules`` in ``modules/prompt_parser.py``, the ``<type:args>`` tags of
``modules/extra_networks.py`` and the chunking of ``modules/sd_hijack_clip.py``). The webui parses prompt
editing with a lark grammar; here every parser is one pass with explicit stacks, so 1,000 nested brackets or
50,000 characters neither recurse nor backtrack. Where the webui crashes (a weight such as ``(x:1.2.3)``, a
step that is not finite) we raise :class:`InvalidRequestError` instead.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.errors import InvalidRequestError, echo

__all__ = [
    "MAX_SCHEDULE_STEPS",
    "Network",
    "echo",
    "extract_networks",
    "parse_attention",
    "prompt_schedule",
]

log = logging.getLogger(__name__)

_ROUND = 1.1
_SQUARE = 1 / 1.1
#: Prompt editing and alternation make one text per step: a bound the webui lacks (its steps are bounded
#: elsewhere), so ``/prompt explain`` with a forged step count cannot build billions of them.
MAX_SCHEDULE_STEPS = 1000

# Attention tokens, first match wins: an escape (a lone backslash yields nothing, as in the webui), an opener,
# an explicit weight closing a round bracket, a closer, a run of plain text, a lone colon.
_ATTENTION = re.compile(r"\\[()\[\]\\]?|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
# lark's SIGNED_NUMBER (ASCII digits), with the optional whitespace the webui's grammar allows around it.
_STEP = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*")
_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_NETWORK_TYPES = {"lora": "lora", "lyco": "lora", "hypernet": "hypernet"}


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into runs of equal attention weight, exactly as the webui's ``parse_prompt_attention``.

    ``(x)`` multiplies by 1.1, ``(x:w)`` by ``w``, ``[x]`` divides by 1.1; unclosed openers apply to the rest
    of the prompt, unmatched closers are literal text, ``\\(`` etc. are literal brackets. ``BREAK`` (a word
    of its own) becomes ``("BREAK", -1.0)``, multiplied like any run. Adjacent runs of equal weight merge.

    Raises:
        InvalidRequestError: a weight is not a number, or a resulting weight is not finite.
    """
    texts: list[str] = []
    base: list[float] = []
    ops: list[tuple[int, int, float]] = []  # (first run, end run, multiplier), in the webui's order
    round_open: list[int] = []
    square_open: list[int] = []
    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token[0] == "\\":
            texts.append(token[1:])
            base.append(1.0)
        elif token == "(":
            round_open.append(len(texts))
        elif token == "[":
            square_open.append(len(texts))
        elif weight is not None and round_open:
            ops.append((round_open.pop(), len(texts), _attention_weight(weight)))
        elif token == ")" and round_open:
            ops.append((round_open.pop(), len(texts), _ROUND))
        elif token == "]" and square_open:
            ops.append((square_open.pop(), len(texts), _SQUARE))
        else:
            _add_text(token, texts, base)
    ops.extend((start, len(texts), _ROUND) for start in round_open)
    ops.extend((start, len(texts), _SQUARE) for start in square_open)
    if not texts:
        return [("", 1.0)]
    weights = np.array(base, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        for start, end, multiplier in ops:  # numpy multiplies each element exactly as Python floats do
            weights[start:end] *= multiplier
    if not np.isfinite(weights).all():
        raise InvalidRequestError("An attention weight in the prompt is too large; use one like (word:1.3).")
    runs = itertools.groupby(zip(texts, weights.tolist(), strict=True), lambda run: run[1])
    return [("".join(text for text, _ in group), weight) for weight, group in runs]


def _add_text(token: str, texts: list[str], base: list[float]) -> None:
    for i, part in enumerate(_BREAK.split(token)):
        if i:
            texts.append("BREAK")
            base.append(-1.0)
        texts.append(part)
        base.append(1.0)


def _attention_weight(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidRequestError(
            f"The attention weight '{echo(text)}' is not a number; write it like (word:1.3)."
        ) from None


@dataclass(frozen=True)
class _Node:
    """A bracket construct that parses: ``kind`` is "emphasis", "scheduled" or "alternate"."""

    kind: str
    end: int  # one past the closing bracket
    seps: tuple[int, ...]  # positions of its top-level ':' or '|'


def _close(text: str, opener: str, colons: list[int], pipes: list[int], at: int) -> _Node | None:
    closer = text[at]
    if (opener == "(") != (closer == ")"):
        return None
    if pipes:
        return _Node("alternate", at + 1, tuple(pipes))
    if opener == "[" and colons:
        if _STEP.fullmatch(text, colons[-1] + 1, at) is None:
            return None
        return _Node("scheduled", at + 1, tuple(colons))
    return _Node("emphasis", at + 1, ())


def _escape_end(text: str, at: int) -> int:
    """Where the escape at ``at`` ends; -1 at the end of the text or before a newline (the grammar fails)."""
    return at + 2 if at + 1 < len(text) and text[at + 1] != "\n" else -1


def _separator_ok(sep: str, opener: str, colons: list[int], pipes: list[int]) -> bool:
    """Whether a construct may take one more ':' (``(a:w)``, ``[a:b:n]``) or '|' (``[a|b]`` only)."""
    if sep == ":":
        return not pipes and len(colons) < (1 if opener == "(" else 2)
    return opener == "[" and not colons


def _scan(text: str, start: int, memo: dict[int, _Node | None]) -> None:
    """Parse the construct opening at ``start`` (and those nested in it) into ``memo``; None: no parse.

    Inside a construct the grammar allows no stray bracket, ':' or '|', so the first error fails every
    construct still open.
    """
    stack: list[tuple[int, list[int], list[int]]] = [(start, [], [])]
    i = start + 1
    n = len(text)
    while stack and i < n:
        c = text[i]
        top, colons, pipes = stack[-1]
        if c == "\\":
            i = _escape_end(text, i)
            if i < 0:
                break
            continue
        if c in ("(", "["):
            if i not in memo:
                stack.append((i, [], []))
                i += 1
                continue
            node = memo[i]
            if node is None:
                break
            i = node.end
            continue
        if c in (":", "|"):
            if not _separator_ok(c, text[top], colons, pipes):
                break
            (colons if c == ":" else pipes).append(i)
        elif c in (")", "]"):
            closed = _close(text, text[top], colons, pipes, i)
            if closed is None:
                break
            memo[top] = closed
            stack.pop()
        i += 1
    for frame in stack:
        memo[frame[0]] = None


def _when(number: str, steps: int, int_offset: int, float_offset: float, old: bool) -> int:
    v = float(number)
    if old:
        v = v * steps if v < 1 else v
    elif "." in number:
        v = (v - float_offset) * steps
    else:
        v = v - int_offset
    if not math.isfinite(v):
        raise InvalidRequestError(
            f"The prompt-editing step '{echo(number)}' is too large; use a step or fraction."
        )
    return min(steps, int(v))


def prompt_schedule(
    text: str, steps: int, *, hires_steps: int | None = None, old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """The prompt's texts over the steps, as the webui's ``get_learned_conditioning_prompt_schedules``.

    ``[from:to:when]`` switches at ``when`` (``[to:when]`` adds, ``[from::when]`` removes): written with a
    '.' a fraction of the steps, else a step (``old_scheduling``: below 1 a fraction, else a step). ``[a|b]``
    alternates every step. A prompt the grammar rejects (a top-level '|', a trailing '\\') stays whole.

    Args:
        text: The prompt (extra-network tags already removed).
        steps: Sampling steps (of the first pass).
        hires_steps: Steps of the hires pass: then whole numbers count on from ``steps`` and fractions run
            from 1.0 to 2.0, as the webui's new scheduling does.
        old_scheduling: The webui's "use old prompt editing timelines" option.

    Returns:
        ``(until_step, text)`` pairs, ascending; the last one is at the (hires) step count.

    Raises:
        InvalidRequestError: ``steps`` is not between 1 and :data:`MAX_SCHEDULE_STEPS`, or a step number is
            not finite.
    """
    for count in (steps, hires_steps):
        if count is not None and not 1 <= count <= MAX_SCHEDULE_STEPS:
            raise InvalidRequestError(f"The number of steps must be between 1 and {MAX_SCHEDULE_STEPS:,}.")
    int_offset, float_offset = 0, 0.0
    if hires_steps is not None and not old_scheduling:
        int_offset, float_offset, steps = steps, 1.0, hires_steps
    memo: dict[int, _Node | None] = {}
    if not _parse_top_level(text, memo):
        log.debug("prompt editing: the grammar rejects %r, kept whole", text[:80])
        return [(steps, text)]
    pieces, whens, alternates = _pieces(text, memo, steps, int_offset, float_offset, old_scheduling)
    marks = {steps, *(w for w in whens if w >= 1)}
    if alternates:
        marks.update(range(1, steps + 1))
    return [(step, _render(pieces, step)) for step in sorted(marks)]


def _parse_top_level(text: str, memo: dict[int, _Node | None]) -> bool:
    """Fill ``memo`` with every construct of the parse; False when the grammar rejects the text."""
    n = len(text)
    i = 0
    while i < n:
        c = text[i]
        if c in ("(", "["):
            if i not in memo:
                _scan(text, i, memo)
            node = memo[i]
            i = node.end if node is not None else i + 1
        elif c == "|":
            return False
        elif c == "\\":
            i = _escape_end(text, i)
            if i < 0:
                return False
        else:
            i += 1
    return True


_Piece = tuple[str, Any]


def _pieces(
    text: str, memo: dict[int, _Node | None], steps: int, int_offset: int, float_offset: float, old: bool
) -> tuple[list[_Piece], list[int], bool]:
    """Flatten the parse into literal text and open/sep/close marks for the switching constructs."""
    actions: dict[int, tuple[str, Any]] = {}
    whens: list[int] = []
    alternates = False
    for start, node in memo.items():
        if node is None or node.kind == "emphasis":
            continue
        last = node.end - 1
        if node.kind == "alternate":
            alternates = True
            actions[start] = ("alt", len(node.seps) + 1)
            actions.update((p, ("sep", None)) for p in node.seps)
        else:
            number = _STEP.fullmatch(text, node.seps[-1] + 1, last)
            assert number is not None
            when = _when(number.group(1), steps, int_offset, float_offset, old)
            whens.append(when)
            actions[start] = ("sched", when) if len(node.seps) == 2 else ("sched_to", when)
            if len(node.seps) == 2:
                actions[node.seps[0]] = ("sep", None)
            actions[node.seps[-1]] = ("skip", last)
        actions[last] = ("close", None)
    pieces: list[_Piece] = []
    i = 0
    for pos in sorted(actions):
        if pos < i:
            continue
        if pos > i:
            pieces.append(("text", text[i:pos]))
        kind, arg = actions[pos]
        if kind == "sched_to":
            pieces += [("sched", arg), ("sep", None)]
        elif kind != "skip":
            pieces.append((kind, arg))
        i = arg if kind == "skip" else pos + 1
    if i < len(text):
        pieces.append(("text", text[i:]))
    return pieces, whens, alternates


def _render(pieces: list[_Piece], step: int) -> str:
    """The prompt's text at ``step``: each construct shows its chosen part only."""
    out: list[str] = []
    stack: list[list[Any]] = []  # [parent active, chosen part, current part]
    active = True
    for kind, arg in pieces:
        if kind == "text":
            if active:
                out.append(arg)
        elif kind == "sched" or kind == "alt":
            chosen = (0 if step <= arg else 1) if kind == "sched" else (step - 1) % arg
            stack.append([active, chosen, 0])
            active = active and chosen == 0
        elif kind == "sep":
            frame = stack[-1]
            frame[2] += 1
            active = frame[0] and frame[1] == frame[2]
        else:
            active = stack.pop()[0]
    return "".join(out)


@dataclass(frozen=True)
class Network:
    """An extra network tag: ``<lora:name:w>`` (``<lyco:...>`` reads as lora) or ``<hypernet:name:w>``.

    ``te_weight``/``unet_weight`` are the LoRA's text-encoder and UNet multipliers (``te=``/``unet=`` or the
    third positional value; both default to ``weight``); for a hypernetwork both equal ``weight``.
    """

    type: str
    name: str
    weight: float
    te_weight: float
    unet_weight: float


def extract_networks(text: str) -> tuple[str, list[Network]]:
    """Remove every ``<type:name[:args]>`` tag from ``text`` and return them, as the webui does.

    A tag without its closing ``>`` is plain text.

    Raises:
        InvalidRequestError: an unknown network type, an empty name, or a weight that is not a finite number.
    """
    networks: list[Network] = []

    def take(match: re.Match[str]) -> str:
        networks.append(_network(match.group(0), match.group(1), match.group(2).split(":")))
        return ""

    return _NETWORK.sub(take, text), networks


def _network(tag: str, kind: str, items: list[str]) -> Network:
    if kind not in _NETWORK_TYPES:
        raise InvalidRequestError(
            f"Unknown extra network type '{echo(kind)}'; use <lora:name:weight> or <hypernet:name:weight>."
        )
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items:  # the webui's ExtraNetworkParams: "key=value" is named, anything else positional
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if not positional or not positional[0]:
        raise InvalidRequestError(
            f"The extra network tag '{echo(tag)}' has no name; write it as <lora:name:0.8>."
        )
    weight = _network_weight(tag, positional[1]) if len(positional) > 1 else 1.0
    if _NETWORK_TYPES[kind] == "hypernet":
        return Network("hypernet", positional[0], weight, weight, weight)
    te = _network_weight(tag, named["te"]) if "te" in named else weight
    unet = _network_weight(tag, positional[2]) if len(positional) > 2 else te
    unet = _network_weight(tag, named["unet"]) if "unet" in named else unet
    return Network("lora", positional[0], weight, te, unet)


def _network_weight(tag: str, value: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise InvalidRequestError(
            f"The weight '{echo(value)}' in '{echo(tag)}' is not a number; write one like 0.8."
        )
    return weight
