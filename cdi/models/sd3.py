"""Stable Diffusion 3: an MMDiT transformer on flow-matching latents, conditioned on two CLIP
encoders and a T5 encoder, encoded as ``StableDiffusion3Pipeline`` encodes its prompts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cdi.errors import InputError, MalformedModelError
from cdi.models.base import ImageCondition
from cdi.models.detect import ModelInfo
from cdi.models.flow import FlowAdapter
from cdi.models.loading import load_component
from cdi.models.text import PackedCondition, captions_of, clip_states, t5_states

#: T5 tokens StableDiffusion3Pipeline encodes by default (``max_sequence_length``), whatever
#: the tokenizer's own ``model_max_length``: the captions are padded or truncated to it.
T5_TOKENS = 256


class SD3Adapter(FlowAdapter):
    family = "sd3"
    timestep_in_steps = True
    default_max_shift = 1.16
    lora_text_encoders = ("text_encoder", "text_encoder_2")

    def __init__(self, info: ModelInfo, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(info, device, dtype)
        # Without a T5 encoder the pipeline puts zeros in the place of its states.
        self.text_encoder_3 = load_component(info, "text_encoder_3", dtype).to(self.device) \
            if "text_encoder_3" in info.components else None
        self.tokenizer_3 = load_component(info, "tokenizer_3") if "tokenizer_3" in info.components else None
        self.t5_tokens = T5_TOKENS
        config = self.transformer.config
        self.joint_dim = int(config.joint_attention_dim)
        clip_tokens = int(self.tokenizer.model_max_length)
        self._packing = PackedCondition([(clip_tokens + self.t5_tokens, self.joint_dim),
                                         (int(config.pooled_projection_dim),)])

    @classmethod
    def image_seq_len(cls, info: ModelInfo) -> int:
        """Tokens the MMDiT sees for one image: latents in patches of the config's patch size
        (StableDiffusion3Pipeline's ``image_seq_len`` for a resolution-dependent shift)."""
        patch = info.configs["transformer"].get("patch_size", 2)
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise MalformedModelError(f"{info.reference.source}: transformer patch_size must be a positive integer")
        return int((info.image_size // cls.vae_factor(info) // patch) ** 2)

    def lora_pipeline_class(self) -> object:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def condition(self, conditions: Sequence[ImageCondition],
                  original_sizes: Sequence[tuple[int, int] | None] | None = None) -> torch.Tensor:
        """Per image, packed: the CLIP penultimate states (both encoders side by side, padded
        to the T5 width) followed by the T5 states ``[L + 256, D]``, and both CLIP pooled
        embeddings ``[P]``."""
        captions = captions_of(conditions)
        # Both CLIP tokenizers pad to the first one's length, as the pipeline does.
        length = int(self.tokenizer.model_max_length)
        first, pooled_1 = clip_states(self.tokenizer, self.text_encoder, captions, self.device, penultimate=True)
        second, pooled_2 = clip_states(self.tokenizer_2, self.text_encoder_2, captions, self.device,
                                       penultimate=True, max_length=length)
        clip = torch.cat([first, second], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(captions), self.t5_tokens, self.joint_dim, device=self.device, dtype=clip.dtype)
        else:
            t5 = t5_states(self.tokenizer_3, self.text_encoder_3, captions, self.t5_tokens, self.device)
        return self._packing.pack(torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat([pooled_1, pooled_2], -1))

    def eps(self, z_t: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            raise InputError("a text-conditional model needs text-encoder states")
        states, pooled = self._packing.unpack(cond)
        out = self.transformer(
            hidden_states=z_t.to(self.dtype),
            encoder_hidden_states=states.to(self.dtype),
            pooled_projections=pooled.to(self.dtype),
            # The pipeline passes the scheduler's float32 σ·T whatever the model's dtype.
            timestep=self._model_timesteps(t, z_t.shape[0]),
        ).sample
        return self._to_eps(out, z_t, t)
