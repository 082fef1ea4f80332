"""Prompt conditioning with the webui's semantics: weighted 75-token chunks and prompt editing mid-run.

Our implementation of ``FrozenCLIPEmbedderWithCustomWords`` (``modules/sd_hijack_clip.py``): the prompt is
parsed (:func:`~pipelines.prompts.parse_attention`), cut into 75-token chunks
(:func:`~pipelines.prompt_chunks.chunk_tokens`), each chunk encoded as ``[BOS] + 75 tokens + [EOS]``,
multiplied by its token weights and rescaled to its unweighted mean, and the chunks concatenated. The
results go to diffusers as ``prompt_embeds``/``negative_prompt_embeds`` (and the pooled embeddings for SDXL).
Extra-network tags must already be removed from the texts (:func:`~pipelines.prompts.extract_networks`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.adapters.embeddings import expand_embedding_words
from models.cache import LoadedModel
from models.families import Family
from pipelines.modes import latents_hook
from pipelines.prompt_chunks import Chunk, chunk_tokens
from pipelines.prompts import extract_networks, parse_attention, prompt_schedule
from storage.errors import InvalidRequestError

__all__ = [
    "Encoded",
    "ScheduledConditioning",
    "conditioned",
    "encode_pair",
    "encode_prompt",
    "pipeline_kwargs",
]

log = logging.getLogger(__name__)

StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Encoded:
    """One text's conditioning.

    Attributes:
        embeds: ``(1, 77 * n_chunks, dim)``; for SDXL both encoders' hidden states concatenated on ``dim``.
        pooled: SDXL: ``text_encoder_2``'s projected pooled output of the first chunk, ``(1, dim2)``;
            None for SD 1.x.
        n_chunks: How many 77-token windows ``embeds`` holds.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    n_chunks: int


def _is_xl(model: LoadedModel) -> bool:
    return model.family == Family.sdxl


def _chunks(model: LoadedModel, text: str) -> list[Chunk]:
    weighted = parse_attention(text)
    tokenizer = model.base.tokenizer
    if not model.embeddings:
        return chunk_tokens(weighted, tokenizer)
    # a loaded embedding's name becomes the token strings holding its vectors, kept whole in one chunk
    weighted = [
        (t if (t, w) == ("BREAK", -1) else expand_embedding_words(t, model.embeddings), w)
        for t, w in weighted
    ]
    first_ids = {
        int(tokenizer.convert_tokens_to_ids(tokens[0])): len(tokens) for tokens in model.embeddings.values()
    }
    return chunk_tokens(weighted, tokenizer, first_ids)


def _max_clip_skip(model: LoadedModel) -> int:
    """SD 1.x may stop at any layer's output; SDXL starts at the penultimate one."""
    pipe = model.base
    if _is_xl(model):
        layers = min(pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_hidden_layers)
        return int(layers) - 1
    return int(pipe.text_encoder.config.num_hidden_layers)


def _check_clip_skip(model: LoadedModel, clip_skip: int) -> None:
    top = _max_clip_skip(model)
    if not 1 <= clip_skip <= top:
        raise InvalidRequestError(f"Clip skip must be between 1 and {top} for this model.")


def _token_ids(chunks: Sequence[Chunk], source: Any, tokenizer: Any, device: torch.device) -> torch.Tensor:
    """``(n, 77)`` ids for ``tokenizer``: BOS + the chunk's tokens + EOS, padding after the first EOS.

    The chunks hold ``source``'s ids; they are mapped through the token strings, so a tokenizer with the
    same vocabulary but another pad token (SDXL's second one pads with "!") gets its own ids.
    """
    bos, eos, pad = int(tokenizer.bos_token_id), int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    rows: list[list[int]] = []
    for chunk in chunks:
        tokens = list(chunk.tokens)
        if tokenizer is not source:
            tokens = [int(i) for i in tokenizer.convert_tokens_to_ids(source.convert_ids_to_tokens(tokens))]
        row = [bos, *tokens, eos]
        first_eos = row.index(eos)
        rows.append(row[: first_eos + 1] + [pad] * (len(row) - first_eos - 1))
    return torch.tensor(rows, dtype=torch.long, device=device)


def _weigh(z: torch.Tensor, chunks: Sequence[Chunk]) -> torch.Tensor:
    """Multiply each position by its weight, then restore each chunk's mean (the webui's "Original").

    In float32 whatever ``z`` is, as the webui's float32 multipliers promote it: float16 would round
    1.1 to 1.0996 and overflow where a large weight meets a large activation.
    """
    weights = torch.tensor([[1.0, *c.weights, 1.0] for c in chunks], dtype=torch.float32, device=z.device)
    if bool((weights == 1.0).all()):
        return z
    wide = z.float()
    original = wide.mean(dim=(1, 2), keepdim=True)
    wide = wide * weights.unsqueeze(-1)
    new = wide.mean(dim=(1, 2), keepdim=True)
    return (wide * torch.where(new == 0, torch.ones_like(new), original / new)).to(z.dtype)


def _final_norm(encoder: Any) -> Any:
    """The encoder's final layer norm (transformers 5 keeps it on the model, 4.x on ``text_model``)."""
    return getattr(encoder, "text_model", encoder).final_layer_norm


def _encode_chunks(model: LoadedModel, chunks: Sequence[Chunk], clip_skip: int) -> Encoded:
    pipe = model.base
    device = pipe._execution_device
    ids = _token_ids(chunks, pipe.tokenizer, pipe.tokenizer, device)
    n = len(chunks)
    with torch.no_grad():
        if not _is_xl(model):
            out = pipe.text_encoder(ids, output_hidden_states=clip_skip > 1)
            if clip_skip > 1:
                z = _final_norm(pipe.text_encoder)(out.hidden_states[-clip_skip])
            else:
                z = out.last_hidden_state
            z = _weigh(z, chunks)
            return Encoded(z.reshape(1, n * z.shape[1], z.shape[2]), None, n)
        out1 = pipe.text_encoder(ids, output_hidden_states=True)
        ids2 = _token_ids(chunks, pipe.tokenizer, pipe.tokenizer_2, device)
        out2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
        z1 = _weigh(out1.hidden_states[-(clip_skip + 1)], chunks)
        z2 = _weigh(out2.hidden_states[-(clip_skip + 1)], chunks)
        z = torch.cat([z1, z2], dim=-1)
        pooled = out2.text_embeds[:1]
    return Encoded(z.reshape(1, n * z.shape[1], z.shape[2]), pooled, n)


def _pad(model: LoadedModel, chunks: list[Chunk], n: int | None) -> list[Chunk]:
    if n is None:
        return chunks
    if n < len(chunks):
        raise ValueError(f"the prompt needs {len(chunks)} chunks, more than the {n} asked for")
    return chunks + _chunks(model, "") * (n - len(chunks))


def encode_prompt(model: LoadedModel, text: str, *, clip_skip: int = 1, chunks: int | None = None) -> Encoded:
    """Encode ``text`` as the webui does (attention weights, 75-token chunks, BREAK).

    Args:
        model: A loaded SD 1.x or SDXL model.
        text: The prompt, extra-network tags removed.
        clip_skip: The webui's "Clip skip": 1 uses the last layer (SDXL: the penultimate, as diffusers),
            2 the one before, and so on.
        chunks: Pad with empty-prompt chunks to this many (to match another prompt's length).

    Raises:
        InvalidRequestError: bad attention syntax or clip skip.
        ValueError: ``text`` needs more than ``chunks`` chunks.
    """
    _check_clip_skip(model, clip_skip)
    return _encode_chunks(model, _pad(model, _chunks(model, text), chunks), clip_skip)


def encode_pair(
    model: LoadedModel, prompt: str, negative: str, *, clip_skip: int = 1
) -> tuple[Encoded, Encoded]:
    """The prompt and negative prompt, the shorter one padded to the other's chunk count."""
    _check_clip_skip(model, clip_skip)
    pos, neg = _chunks(model, prompt), _chunks(model, negative)
    n = max(len(pos), len(neg))
    return (
        _encode_chunks(model, _pad(model, pos, n), clip_skip),
        _encode_chunks(model, _pad(model, neg, n), clip_skip),
    )


def _as_kwargs(pos: Encoded, neg: Encoded, batch: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "prompt_embeds": pos.embeds.repeat(batch, 1, 1),
        "negative_prompt_embeds": neg.embeds.repeat(batch, 1, 1),
    }
    if pos.pooled is not None and neg.pooled is not None:
        kwargs["pooled_prompt_embeds"] = pos.pooled.repeat(batch, 1)
        kwargs["negative_pooled_prompt_embeds"] = neg.pooled.repeat(batch, 1)
    return kwargs


def pipeline_kwargs(
    model: LoadedModel, prompt: str, negative: str, batch: int, clip_skip: int = 1
) -> dict[str, Any]:
    """Embeddings for a diffusers call in place of ``prompt=``/``negative_prompt=`` (and ``clip_skip=``).

    Returns:
        ``prompt_embeds`` and ``negative_prompt_embeds`` (SDXL: also ``pooled_prompt_embeds`` and
        ``negative_pooled_prompt_embeds``), each with ``batch`` rows.
    """
    pos, neg = encode_pair(model, prompt, negative, clip_skip=clip_skip)
    return _as_kwargs(pos, neg, batch)


class ScheduledConditioning:
    """Prompt editing (``[a:b:when]``) and alternation (``[a|b]``) for one diffusers run.

    Each distinct scheduled text (of the prompt and of the negative prompt) is encoded once, all padded to
    the same chunk count. Sampling step ``i`` (0-based, as the webui's denoiser counts) uses the first
    schedule entry whose ``until_step`` is at least ``i``. Pass :meth:`initial_kwargs` to the pipeline and
    :meth:`callback` as ``callback_on_step_end`` with ``callback_on_step_end_tensor_inputs=tensor_inputs``
    (or all of it via :meth:`callback_kwargs`).
    """

    def __init__(
        self, model: LoadedModel, prompt: str, negative: str, steps: int, batch: int, clip_skip: int = 1
    ) -> None:
        _check_clip_skip(model, clip_skip)
        self.batch = batch
        self.positive = prompt_schedule(prompt, steps)
        self.negative = prompt_schedule(negative, steps)
        texts = dict.fromkeys(text for _, text in [*self.positive, *self.negative])
        chunked = {text: _chunks(model, text) for text in texts}
        self.n_chunks = max(len(c) for c in chunked.values())
        self._encoded = {
            text: _encode_chunks(model, _pad(model, chunks, self.n_chunks), clip_skip)
            for text, chunks in chunked.items()
        }
        #: What the callback reads and replaces: SDXL's pooled embeddings travel in ``add_text_embeds``.
        self.tensor_inputs = ["prompt_embeds", "add_text_embeds"] if _is_xl(model) else ["prompt_embeds"]
        log.debug("conditioning: %d texts, %d chunks", len(self._encoded), self.n_chunks)

    @property
    def is_scheduled(self) -> bool:
        """Whether the texts change during the run (else the callback never changes anything)."""
        return len(self.positive) > 1 or len(self.negative) > 1

    def texts_at(self, step: int) -> tuple[str, str]:
        """The prompt and negative prompt texts used by 0-based sampling step ``step``."""
        return _text_at(self.positive, step), _text_at(self.negative, step)

    def encoded(self, text: str) -> Encoded:
        """The conditioning of one scheduled text."""
        return self._encoded[text]

    def initial_kwargs(self) -> dict[str, Any]:
        """:func:`pipeline_kwargs` for the first step's texts."""
        pos, neg = self.texts_at(0)
        return _as_kwargs(self._encoded[pos], self._encoded[neg], self.batch)

    def callback(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``callback_on_step_end``: after step ``step``, put the next step's texts into ``kwargs``.

        Inside the pipeline's loop ``prompt_embeds`` is ``cat([negative, positive])`` under classifier-free
        guidance (else the positive alone), and SDXL's ``add_text_embeds`` likewise holds the pooled pair.
        """
        following = self.texts_at(step + 1)
        if following == self.texts_at(step):
            return kwargs
        pos, neg = (self._encoded[text] for text in following)
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", True))
        current = kwargs["prompt_embeds"]
        embeds = _stack(pos.embeds, neg.embeds, self.batch, cfg)
        kwargs["prompt_embeds"] = embeds.to(current.device, current.dtype)
        if pos.pooled is not None and neg.pooled is not None:
            current = kwargs["add_text_embeds"]
            pooled = _stack(pos.pooled, neg.pooled, self.batch, cfg)
            kwargs["add_text_embeds"] = pooled.to(current.device, current.dtype)
        return kwargs

    def callback_kwargs(self, then: StepCallback | None = None) -> dict[str, Any]:
        """``callback_on_step_end`` (this callback, then ``then`` if given) and its tensor inputs.

        The running job's :data:`~pipelines.modes.latents_hook`, when set, also sees the latents.
        """
        preview = latents_hook.get()

        def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            kwargs = self.callback(pipe, step, timestep, kwargs)
            if then is not None:
                kwargs = then(pipe, step, timestep, kwargs)
            if preview is not None and "latents" in kwargs:
                preview(step + 1, int(getattr(pipe, "num_timesteps", 0) or step + 1), kwargs["latents"])
            return kwargs

        inputs = self.tensor_inputs if preview is None else [*self.tensor_inputs, "latents"]
        return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": inputs}


def _text_at(schedule: list[tuple[int, str]], step: int) -> str:
    for until, text in schedule:
        if step <= until:
            return text
    return schedule[-1][1]


def _stack(pos: torch.Tensor, neg: torch.Tensor, batch: int, cfg: bool) -> torch.Tensor:
    reps = (batch,) + (1,) * (pos.dim() - 1)
    if not cfg:
        return pos.repeat(*reps)
    return torch.cat([neg.repeat(*reps), pos.repeat(*reps)])


def conditioned(model: LoadedModel, spec: Any, then: StepCallback | None = None) -> dict[str, Any]:
    """Everything a diffusers call needs for ``spec``'s prompts: embeddings and the step callback.

    Use instead of ``prompt=``/``negative_prompt=``/``clip_skip=``/``callback_on_step_end=``; ``then`` is
    the runner's own progress callback, called after the conditioning switch.
    """
    prompt, negative = extract_networks(spec.prompt)[0], extract_networks(spec.negative_prompt)[0]
    conditioning = ScheduledConditioning(model, prompt, negative, spec.steps, spec.batch, spec.clip_skip)
    return {**conditioning.initial_kwargs(), **conditioning.callback_kwargs(then)}
