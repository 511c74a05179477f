"""Captions to text-encoder states, as the text-to-image pipelines encode their prompts.

One place for what Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux share: checking the
captions, running a CLIP or T5 encoder, and carrying several conditioning tensors through
the feature code as one ``[B, N]`` tensor (the batch first, so it can be sliced and
concatenated like any other conditioning).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from cdi.errors import InputError
from cdi.models.base import ImageCondition


def captions_of(conditions: Sequence[ImageCondition]) -> list[str]:
    """One caption per image; an image without one is encoded as the empty prompt ``""``."""
    captions: list[str] = []
    for c in conditions:
        if c is not None and not isinstance(c, str):
            raise InputError(f"a text-conditional model needs a caption (text) per image, got {c!r}")
        captions.append(c or "")
    return captions


def _tokens(tokenizer: Any, captions: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    ids: torch.Tensor = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                                  return_tensors="pt").input_ids
    return ids.to(device)


def clip_states(tokenizer: Any, encoder: Any, captions: list[str], device: torch.device,
                penultimate: bool, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A CLIP encoder's token states ``[B, L, D]`` and its pooled output ``[B, P]``.

    ``penultimate`` takes the states of the last-but-one layer, as SDXL and SD3 do (SD 1.x/2.x
    and Flux's pooled vector use the last). ``max_length`` pads (and truncates) to another
    length than the tokenizer's own, as SD3 pads its second CLIP to the first's. The pooled
    output is the projected ``text_embeds`` of a ``CLIPTextModelWithProjection``, else the
    ``pooler_output``.
    """
    ids = _tokens(tokenizer, captions, int(max_length or tokenizer.model_max_length), device)
    with torch.inference_mode():
        out = encoder(ids, output_hidden_states=penultimate)
    states = out.hidden_states[-2] if penultimate else out.last_hidden_state
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        pooled = out.pooler_output
    return states.clone(), pooled.clone()


def t5_states(tokenizer: Any, encoder: Any, captions: list[str], max_length: int,
              device: torch.device) -> torch.Tensor:
    """A T5 encoder's last hidden states ``[B, max_length, D]`` (padded to ``max_length``)."""
    ids = _tokens(tokenizer, captions, max_length, device)
    with torch.inference_mode():
        states: torch.Tensor = encoder(ids).last_hidden_state
    return states.clone()


class PackedCondition:
    """Several per-image conditioning tensors flattened side by side into one ``[B, N]``.

    ``shapes`` are the per-image shapes of the parts, in order; :meth:`pack` and
    :meth:`unpack` are inverse.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]]) -> None:
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]

    def pack(self, *parts: torch.Tensor) -> torch.Tensor:
        if len(parts) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} conditioning parts, got {len(parts)}")
        batch = int(parts[0].shape[0])
        for p, s in zip(parts, self.shapes, strict=True):
            if tuple(p.shape[1:]) != s or int(p.shape[0]) != batch:
                raise ValueError(f"conditioning part of shape {tuple(p.shape)}, expected [{batch}, {s}]")
        return torch.cat([p.float().reshape(batch, -1) for p in parts], dim=1)

    def unpack(self, packed: torch.Tensor) -> list[torch.Tensor]:
        if packed.dim() != 2 or int(packed.shape[1]) != sum(self.sizes):
            raise InputError(f"conditioning of shape {tuple(packed.shape)} does not fit this model")
        batch = int(packed.shape[0])
        parts = torch.split(packed, list(self.sizes), dim=1)
        return [p.reshape(batch, *s) for p, s in zip(parts, self.shapes, strict=True)]
