"""SDXL: the Stable Diffusion UNet with two CLIP text encoders, a pooled text embedding and
size conditioning (``add_time_ids``), encoded as ``StableDiffusionXLPipeline`` encodes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cdi.errors import MalformedModelError
from cdi.models.base import ImageCondition
from cdi.models.detect import ModelInfo
from cdi.models.loading import load_component
from cdi.models.stable_diffusion import StableDiffusionAdapter
from cdi.models.text import PackedCondition, captions_of, clip_states

#: original size (2) + crop top-left (2) + target size (2).
_TIME_IDS = 6


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    family = "stable-diffusion-xl"
    vae_force_upcast = True
    lora_text_encoders = ("text_encoder", "text_encoder_2")

    def __init__(self, info: ModelInfo, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(info, device, dtype)
        self.text_encoder_2 = load_component(info, "text_encoder_2", dtype).to(self.device)
        self.tokenizer_2 = load_component(info, "tokenizer_2")
        length = int(self.tokenizer.model_max_length)
        if int(self.tokenizer_2.model_max_length) != length:
            raise MalformedModelError(
                f"{info.reference.source}: the two tokenizers pad to {length} and "
                f"{self.tokenizer_2.model_max_length} tokens; SDXL concatenates their states")
        width = int(self.text_encoder.config.hidden_size) + int(self.text_encoder_2.config.hidden_size)
        pooled = int(self.text_encoder_2.config.projection_dim)
        # The check StableDiffusionXLPipeline makes before its first step: the UNet's added
        # embedding must take six time ids and the pooled vector.
        expected = int(self.unet.add_embedding.linear_1.in_features) if hasattr(self.unet, "add_embedding") else -1
        given = int(self.unet.config.get("addition_time_embed_dim") or 0) * _TIME_IDS + pooled
        if self.unet.config.get("addition_embed_type") != "text_time" or expected != given:
            raise MalformedModelError(
                f"{info.reference.source}: the UNet takes no SDXL size conditioning of {_TIME_IDS} time ids and "
                f"a {pooled}-wide pooled text embedding (addition_embed_type must be 'text_time')")
        self._packing = PackedCondition([(length, width), (pooled,), (_TIME_IDS,)])

    def lora_pipeline_class(self) -> object:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def time_ids(self, original_sizes: Sequence[tuple[int, int] | None]) -> torch.Tensor:
        """``add_time_ids`` ``[B, 6]``: (original height, width), crop top-left (0, 0) and the
        target size, the model's resolution; an unknown original size is the target size."""
        target = (self.image_size, self.image_size)
        rows = [[*(size or target), 0, 0, *target] for size in original_sizes]
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def condition(self, conditions: Sequence[ImageCondition],
                  original_sizes: Sequence[tuple[int, int] | None] | None = None) -> torch.Tensor:
        """Per image, packed (:class:`~cdi.models.text.PackedCondition`): both encoders'
        penultimate states side by side ``[L, D1 + D2]``, the second encoder's projected pooled
        embedding ``[P]`` and the six time ids."""
        captions = captions_of(conditions)
        sizes = list(original_sizes) if original_sizes is not None else [None] * len(captions)
        if len(sizes) != len(captions):
            raise ValueError("one original size per caption is needed")
        first, _ = clip_states(self.tokenizer, self.text_encoder, captions, self.device, penultimate=True)
        second, pooled = clip_states(self.tokenizer_2, self.text_encoder_2, captions, self.device, penultimate=True)
        return self._packing.pack(torch.cat([first, second], dim=-1), pooled, self.time_ids(sizes))

    def _unet_inputs(self, cond: torch.Tensor) -> dict[str, Any]:
        states, pooled, time_ids = self._packing.unpack(cond)
        return {
            "encoder_hidden_states": states.to(self.dtype),
            "added_cond_kwargs": {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.to(self.dtype)},
        }
