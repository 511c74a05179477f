"""Flux: a rectified-flow transformer on 2×2-packed latents, conditioned on T5 states and a
CLIP pooled embedding (and, for guidance-distilled models, the guidance scale), called as
``FluxPipeline`` calls it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cdi.errors import InputError
from cdi.models.base import ImageCondition
from cdi.models.detect import ModelInfo
from cdi.models.flow import FlowAdapter
from cdi.models.text import PackedCondition, captions_of, clip_states, t5_states

#: T5 tokens FluxPipeline encodes by default (``max_sequence_length``), whatever the
#: tokenizer's own ``model_max_length``: the captions are padded or truncated to it.
T5_TOKENS = 512
#: FluxPipeline's default ``guidance_scale``, given to models with a guidance embedding.
GUIDANCE = 3.5


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, (H/2)·(W/2), 4C]``: each 2×2 patch one token."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Position ids ``[(H/2)·(W/2), 3]`` of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] += torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] += torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class FluxAdapter(FlowAdapter):
    family = "flux"
    timestep_in_steps = False
    default_max_shift = 1.15
    lora_text_encoders = ("text_encoder",)

    def __init__(self, info: ModelInfo, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(info, device, dtype)
        config = self.transformer.config
        self.guidance = GUIDANCE if config.get("guidance_embeds") else None
        self.t5_tokens = T5_TOKENS
        self._packing = PackedCondition([(self.t5_tokens, int(config.joint_attention_dim)),
                                         (int(config.pooled_projection_dim),)])

    def lora_pipeline_class(self) -> object:
        from diffusers import FluxPipeline

        return FluxPipeline

    def condition(self, conditions: Sequence[ImageCondition],
                  original_sizes: Sequence[tuple[int, int] | None] | None = None) -> torch.Tensor:
        """Per image, packed: the T5 states ``[512, D]`` and the CLIP pooled output ``[P]``."""
        captions = captions_of(conditions)
        _, pooled = clip_states(self.tokenizer, self.text_encoder, captions, self.device, penultimate=False)
        states = t5_states(self.tokenizer_2, self.text_encoder_2, captions, self.t5_tokens, self.device)
        return self._packing.pack(states, pooled)

    def describe(self, timesteps: Sequence[int] = ()) -> dict[str, object]:
        return {**super().describe(timesteps), "guidance": self.guidance}

    def _pipeline_timesteps(self, t: int | torch.Tensor, batch: int) -> torch.Tensor:
        """FluxPipeline's ``timestep / 1000``: the scheduler's float32 σ·T cast to the latents'
        dtype, then divided (σ rounded as the pipeline rounds it in float16/bfloat16)."""
        idx = self._timesteps(t, batch).cpu()
        steps = self.schedule.s[idx].to(torch.float32) * float(self.num_train_timesteps)
        return steps.to(self.device, self.dtype) / 1000

    def eps(self, z_t: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            raise InputError("a text-conditional model needs text-encoder states")
        states, pooled = self._packing.unpack(cond)
        b, _, h, w = z_t.shape
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=self.device)
        out = self.transformer(
            hidden_states=pack_latents(z_t.to(self.dtype)),
            encoder_hidden_states=states.to(self.dtype),
            pooled_projections=pooled.to(self.dtype),
            timestep=self._pipeline_timesteps(t, b),
            img_ids=image_ids(h, w, self.device).to(self.dtype),
            txt_ids=torch.zeros(states.shape[1], 3, device=self.device, dtype=self.dtype),
            guidance=guidance,
        ).sample
        return self._to_eps(unpack_latents(out, h, w), z_t, t)
