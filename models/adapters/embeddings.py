"""Textual-inversion embeddings: recognise the webui and diffusers files, apply them for one job, restore.

An embedding is ``n`` learned vectors of the text encoder's token width. The files users bring:

- webui ``.pt``: a torch pickle ``{"string_to_param": {"*": [n, 768]}, "name": ..., "step": ...}``
  (load it with :func:`models.adapters.safe_files.load_pickle_object`);
- webui ``.safetensors``: ``{"emb_params": [n, 768]}``;
- diffusers: ``{token: [768]}`` or ``{token: [n, 768]}``;
- SDXL: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (one half per text encoder).

Applying: :func:`load_embeddings` adds each embedding through diffusers' ``load_textual_inversion`` as the
``n`` tokens ``<name>``, ``<name>_1``, ... (angle brackets keep them apart from the CLIP vocabulary, where
plain words such as ``negative`` already exist, and from the name users type). Prompts are rewritten with
:func:`expand_embedding_words` before tokenising: a whole-word occurrence of a name becomes its token
strings. Names match case-insensitively, as in the webui (which matches lower-cased CLIP tokens); the
added tokens themselves are matched case-insensitively too by the CLIP tokenizer (its normaliser
lower-cases the text and the added tokens are "normalized" ones). ``restore()`` removes the tokens with
diffusers' ``unload_textual_inversion`` and then puts back the very embedding module, tensor and config the
text encoder had, so a later job is bit-identical to one run before.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.adapters.base import AssetInfo, wrong_family
from models.adapters.targets import ModelTarget, model_details, target_for_text_widths
from models.families import Family
from models.registry import file_sha256
from storage.errors import InvalidRequestError
from storage.tables import AssetKind

__all__ = [
    "MAX_VECTORS", "LoadedEmbeddings", "embedding_names_in", "embedding_tokens", "embedding_vectors",
    "expand_embedding_words", "file_short_hash", "inspect_embedding", "load_embeddings", "unload_embeddings"
]  # fmt: skip

log = logging.getLogger(__name__)

#: One prompt chunk holds 75 tokens; an embedding must fit in one.
MAX_VECTORS = 75
_SD15_WIDTH = 768
_SD2_WIDTH = 1024
_SDXL_G_WIDTH = 1280
#: Which half of an SDXL file goes to which text encoder of the pipeline.
_SDXL_PARTS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
_SD2_MESSAGE = (
    "This embedding is for SD 2.x (1024-wide vectors); this server runs SD 1.5 and SDXL models only."
)


@dataclass(frozen=True)
class _Parsed:
    """An embedding file's vectors (``single`` or ``clip_l``/``clip_g``) and what it says about itself."""

    format: str
    vectors: dict[str, torch.Tensor]
    token: str | None = None
    name: str | None = None
    step: int | None = None

    @property
    def count(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def widths(self) -> dict[str, int]:
        return {part: int(t.shape[1]) for part, t in self.vectors.items()}


def _refuse(reason: str) -> InvalidRequestError:
    return InvalidRequestError(f"This embedding file is not usable: {reason}.")


def _matrix(value: object) -> torch.Tensor | None:
    """``value`` as an ``[n, width]`` float tensor, or None when it is not shaped like embedding vectors."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    if value.ndim == 1:
        value = value.unsqueeze(0)
    if value.ndim != 2 or value.shape[1] < 1:
        return None
    return value


def _checked(value: object, what: str) -> torch.Tensor:
    matrix = _matrix(value)
    if matrix is None:
        raise _refuse(f"its {what} is not a list of vectors")
    if not 1 <= matrix.shape[0] <= MAX_VECTORS:
        raise _refuse(f"it has {matrix.shape[0]} vectors, and one prompt chunk holds at most {MAX_VECTORS}")
    if not bool(torch.isfinite(matrix).all()):
        raise _refuse("it contains NaN or infinite values")
    return matrix


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _parse_webui_pt(obj: Mapping[Any, Any]) -> _Parsed:
    params = obj["string_to_param"]
    if not isinstance(params, Mapping) or len(params) != 1:
        raise _refuse("it must hold exactly one term")
    vectors = _checked(next(iter(params.values())), "string_to_param")
    return _Parsed("webui-pt", {"single": vectors}, name=_text(obj.get("name")), step=_int(obj.get("step")))


def _parse(obj: object, metadata: Mapping[str, str]) -> _Parsed | None:
    """Recognise the layout; None when ``obj`` is not an embedding at all."""
    if not isinstance(obj, Mapping):
        return None
    if "string_to_param" in obj:
        return _parse_webui_pt(obj)
    if "clip_l" in obj and "clip_g" in obj:
        if len(obj) != 2:
            raise _refuse("an SDXL embedding holds only clip_l and clip_g")
        parts = {"clip_l": _checked(obj["clip_l"], "clip_l"), "clip_g": _checked(obj["clip_g"], "clip_g")}
        if parts["clip_l"].shape[0] != parts["clip_g"].shape[0]:
            raise _refuse("its clip_l and clip_g hold different numbers of vectors")
        return _Parsed("sdxl", parts, name=_text(metadata.get("name")))
    if len(obj) != 1:
        return None
    key, value = next(iter(obj.items()))
    if not isinstance(key, str) or _matrix(value) is None:
        return None
    vectors = _checked(value, "tensor")
    if key == "emb_params":
        return _Parsed("webui-safetensors", {"single": vectors}, name=_text(metadata.get("name")))
    return _Parsed("diffusers", {"single": vectors}, token=key)


def _file_family(parsed: _Parsed, targets: Sequence[ModelTarget]) -> tuple[Family, ModelTarget | None]:
    """The family the widths fit (SD 1.5's or SDXL's, else a custom target's), or a one-sentence refusal."""
    widths = parsed.widths
    ordered = (widths["single"],) if "single" in widths else (widths["clip_l"], widths["clip_g"])
    if ordered in ((_SD15_WIDTH,), (_SD15_WIDTH, _SDXL_G_WIDTH)):
        return (Family.sd15 if len(ordered) == 1 else Family.sdxl), None
    custom = target_for_text_widths(targets, ordered)
    if custom is not None:
        return custom.family, custom
    if "single" not in widths:
        raise _refuse(
            f"an SDXL embedding has 768- and 1280-wide halves, this one {widths['clip_l']} and "
            f"{widths['clip_g']}"
        )
    if ordered == (_SD2_WIDTH,):
        raise InvalidRequestError(_SD2_MESSAGE)
    if any(not t.canonical for t in targets):
        raise _refuse(f"its vectors are {ordered[0]} wide, which fits none of this server's models")
    raise _refuse(f"its vectors are {ordered[0]} wide, which fits neither SD 1.5 (768) nor SDXL")


def inspect_embedding(
    tensors_or_obj: object,
    metadata: Mapping[str, str] | None = None,
    *,
    targets: Sequence[ModelTarget] = (),
) -> AssetInfo | None:
    """Recognise a textual-inversion embedding and the family its widths fit.

    Args:
        tensors_or_obj: A safetensors file's tensors, or the object of a torch pickle (webui ``.pt``).
        metadata: The safetensors ``__metadata__`` (may name the embedding), if any.
        targets: Model targets tried after SD 1.5's and SDXL's widths: vectors as wide as a custom target's
            text encoder(s) are reported as made for that model (details ``model``, ``model_key``).

    Returns:
        The info (details: ``vectors``, ``width`` or ``widths``, and ``token``/``name``/``step`` when the
        file has them), or None when this is not an embedding.

    Raises:
        InvalidRequestError: It is an embedding but broken, too long, or for SD 2.x / no known model.
    """
    parsed = _parse(tensors_or_obj, metadata or {})
    if parsed is None:
        return None
    family, custom = _file_family(parsed, targets)
    details: dict[str, Any] = {"vectors": parsed.count}
    widths = parsed.widths
    if "single" in widths:
        details["width"] = widths["single"]
    else:
        details["widths"] = widths
    for key in ("token", "name", "step"):
        value = getattr(parsed, key)
        if value is not None:
            details[key] = value
    details.update(model_details(custom))
    return AssetInfo(kind=AssetKind.EMBEDDING, format=parsed.format, family=family, details=details)


def embedding_vectors(obj: object, family: Family) -> dict[str, torch.Tensor]:
    """The vectors per text encoder of a ``family`` pipeline, as float32 ``[n, width]`` tensors.

    Args:
        obj: The loaded file, as given to :func:`inspect_embedding`.
        family: The pipeline's family.

    Returns:
        ``{"text_encoder": [n, 768]}`` for SD 1.5; SDXL adds ``"text_encoder_2": [n, 1280]``. Widths are
        checked against the real encoders by :func:`load_embeddings`.

    Raises:
        InvalidRequestError: Not an embedding, or made for the other family.
    """
    parsed = _parse(obj, {})
    if parsed is None:
        raise _refuse("it is not a textual-inversion embedding")
    single = parsed.vectors.get("single")
    if family == Family.sdxl:
        if single is not None:
            if single.shape[1] == _SD15_WIDTH:
                raise wrong_family(AssetKind.EMBEDDING, Family.sd15, family)
            raise _refuse("SDXL needs an embedding with clip_l and clip_g halves")
        return {enc: parsed.vectors[part].detach().float().clone() for enc, part in _SDXL_PARTS.items()}
    if single is None:
        raise wrong_family(AssetKind.EMBEDDING, Family.sdxl, family)
    return {"text_encoder": single.detach().float().clone()}


def embedding_tokens(name: str, count: int) -> list[str]:
    """The token strings an embedding called ``name`` occupies: ``<name>``, ``<name>_1``, ..."""
    first = f"<{name}>"
    return [first] + [f"{first}_{i}" for i in range(1, count)]


def file_short_hash(path: Path, n: int = 12) -> str:
    """The first ``n`` hex digits of the file's sha256: the webui's "TI hashes" entry for an embedding."""
    return file_sha256(path)[:n]


def _word_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    """Whole-word, case-insensitive matcher for ``names``, longest first (``bad-artist-anime`` before
    ``bad-artist``). A name may not touch a letter, digit or ``_``, nor a ``-``/``.`` that joins it to
    another word, nor the ``<``/``>`` of a token string (so expanding twice changes nothing)."""
    unique = sorted({n for n in names if n}, key=len, reverse=True)
    if not unique:
        return None
    alternatives = "|".join(re.escape(n) for n in unique)
    return re.compile(rf"(?<![\w<])(?<!\w[.\-])(?:{alternatives})(?![\w>]|[.\-]\w)", re.IGNORECASE)


def embedding_names_in(text: str, names: Iterable[str]) -> list[str]:
    """Which of ``names`` occur in ``text`` as whole words (case-insensitive), in order of first use.

    The same rule :func:`expand_embedding_words` uses, so a job loads exactly the embeddings it expands.
    """
    by_key = {n.casefold(): n for n in names}
    pattern = _word_pattern(by_key.values())
    found: dict[str, None] = {}
    if pattern is not None:
        for match in pattern.finditer(text):
            found.setdefault(by_key[match.group(0).casefold()], None)
    return list(found)


def expand_embedding_words(text: str, loaded: Mapping[str, Sequence[str]]) -> str:
    """Replace each whole-word occurrence of a loaded name with its token strings joined by spaces.

    What diffusers' ``maybe_convert_prompt`` is meant to do, for our own conditioning code, which tokenises
    prompt fragments itself. Matching is case-insensitive and whole-word (see :func:`embedding_names_in`);
    text without a loaded name comes back unchanged.

    Args:
        text: A prompt or a fragment of one.
        loaded: Name to its token strings (a :class:`LoadedEmbeddings` is one).
    """
    by_key = {name.casefold(): " ".join(tokens) for name, tokens in loaded.items()}
    pattern = _word_pattern(loaded.keys())
    if pattern is None:
        return text
    return pattern.sub(lambda m: by_key[m.group(0).casefold()], text)


@dataclass
class _EncoderState:
    """What loading changes on one text encoder, kept to put back exactly."""

    tokenizer: Any
    encoder: Any
    module: torch.nn.Module
    weight: torch.Tensor
    num_embeddings: int
    vocab_size: int
    tokenizer_len: int

    @classmethod
    def capture(cls, tokenizer: Any, encoder: Any) -> _EncoderState:
        module = encoder.get_input_embeddings()
        return cls(
            tokenizer=tokenizer,
            encoder=encoder,
            module=module,
            weight=module.weight.data,
            num_embeddings=int(module.num_embeddings),
            vocab_size=int(encoder.config.vocab_size),
            tokenizer_len=len(tokenizer),
        )

    def put_back(self) -> None:
        self.encoder.set_input_embeddings(self.module)
        self.module.weight.data = self.weight
        self.module.num_embeddings = self.num_embeddings  # type: ignore[assignment]
        self.encoder.config.vocab_size = self.vocab_size


@dataclass
class LoadedEmbeddings(Mapping[str, list[str]]):
    """Embeddings applied to a pipeline for one job: name to its token strings, and how to undo it.

    Use as a context manager or call :meth:`restore` (idempotent) when the job ends.
    """

    pipe: Any
    tokens: dict[str, list[str]]
    _states: list[_EncoderState] = field(default_factory=list)
    _restored: bool = False

    def __getitem__(self, name: str) -> list[str]:
        return self.tokens[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def restore(self) -> None:
        """Remove the tokens and put back each text encoder's own embedding module, tensor and config."""
        if self._restored:
            return
        self._restored = True
        all_tokens = [t for tokens in self.tokens.values() for t in tokens]
        for state in self._states:
            if all_tokens and len(state.tokenizer) > state.tokenizer_len:
                with _keep_rng(state.encoder):
                    self.pipe.unload_textual_inversion(
                        tokens=all_tokens, tokenizer=state.tokenizer, text_encoder=state.encoder
                    )
            state.put_back()
            if len(state.tokenizer) != state.tokenizer_len:
                log.error(
                    "tokenizer has %d tokens after unloading embeddings, %d before",
                    len(state.tokenizer),
                    state.tokenizer_len,
                )
        log.debug("unloaded embeddings %s", ", ".join(self.tokens))

    def __enter__(self) -> LoadedEmbeddings:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _keep_rng(encoder: Any) -> AbstractContextManager[Any]:
    """Leave the global RNGs as they were: resizing and unloading draw random rows that are thrown away."""
    device = encoder.get_input_embeddings().weight.device
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)


def _encoders(pipe: Any, family: Family) -> dict[str, tuple[Any, Any]]:
    names = [("text_encoder", "tokenizer")]
    if family == Family.sdxl:
        names.append(("text_encoder_2", "tokenizer_2"))
    return {enc: (getattr(pipe, tok), getattr(pipe, enc)) for enc, tok in names}


def _check_fit(
    encoders: Mapping[str, tuple[Any, Any]], vectors_by_name: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, int]:
    """Check every embedding against the encoders before anything changes; returns name -> vector count."""
    seen: dict[str, str] = {}
    counts: dict[str, int] = {}
    for name, vectors in vectors_by_name.items():
        if name.casefold() in seen:
            raise InvalidRequestError(
                f"The embeddings {seen[name.casefold()]} and {name} differ only in case; use just one."
            )
        seen[name.casefold()] = name
        if set(vectors) != set(encoders):
            raise InvalidRequestError(f"The embedding {name} does not fit this model's text encoders.")
        sizes = {int(v.shape[0]) for v in vectors.values()}
        if len(sizes) != 1:
            raise InvalidRequestError(f"The embedding {name} has halves of different lengths; it is broken.")
        count = sizes.pop()
        for enc, (tokenizer, encoder) in encoders.items():
            expected = int(encoder.get_input_embeddings().weight.shape[-1])
            width = int(vectors[enc].shape[-1])
            if width != expected:
                if width == _SD2_WIDTH and enc == "text_encoder":
                    raise InvalidRequestError(_SD2_MESSAGE)
                raise InvalidRequestError(
                    f"The embedding {name} has {width}-wide vectors but this model's text encoder takes "
                    f"{expected}-wide ones; it was made for another model."
                )
            vocab = tokenizer.get_vocab()
            if any(t in vocab for t in embedding_tokens(name, count)):
                raise ValueError(f"the tokens of embedding {name!r} are already in the tokenizer")
        counts[name] = count
    return counts


def load_embeddings(
    pipe: Any, family: Family, vectors_by_name: Mapping[str, Mapping[str, torch.Tensor]]
) -> LoadedEmbeddings:
    """Add embeddings to ``pipe``'s tokenizer(s) and text encoder(s) for one job.

    Args:
        pipe: A Stable Diffusion or SDXL pipeline (its ``from_pipe`` children share the same encoders).
        family: The pipeline's family.
        vectors_by_name: Asset name to :func:`embedding_vectors`' result.

    Returns:
        Name to token strings; call ``restore()`` (or leave its ``with`` block) after the job.

    Raises:
        InvalidRequestError: An embedding's widths do not fit this model, or two names differ only in case.
    """
    encoders = _encoders(pipe, family)
    counts = _check_fit(encoders, vectors_by_name)
    loaded = LoadedEmbeddings(pipe=pipe, tokens={n: embedding_tokens(n, c) for n, c in counts.items()})
    if not counts:
        return loaded
    names = list(counts)
    try:
        for enc, (tokenizer, encoder) in encoders.items():
            loaded._states.append(_EncoderState.capture(tokenizer, encoder))
            with _keep_rng(encoder):
                # Grow the matrix first without transformers' mean/covariance initialisation (seconds on a
                # CPU, and every new row is overwritten anyway); diffusers' own resize is then a no-op.
                encoder.resize_token_embeddings(len(tokenizer) + sum(counts.values()), mean_resizing=False)
                pipe.load_textual_inversion(
                    [vectors_by_name[n][enc] for n in names],
                    token=[embedding_tokens(n, 1)[0] for n in names],
                    tokenizer=tokenizer,
                    text_encoder=encoder,
                )
    except BaseException:
        loaded.restore()
        raise
    log.debug("loaded embeddings %s", ", ".join(f"{n} ({c})" for n, c in counts.items()))
    return loaded


def unload_embeddings(loaded: LoadedEmbeddings) -> None:
    """Undo :func:`load_embeddings` (the same as ``loaded.restore()``)."""
    loaded.restore()
