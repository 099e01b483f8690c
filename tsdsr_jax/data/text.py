"""SD3 caption embeddings with the three text encoders through ``transformers`` (torch), the same
computation as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` and the official
``data/process.py``: CLIP-L and CLIP-G penultimate hidden states (77 tokens, 768 ⊕ 1280, zero-
padded to T5's 4096) followed by T5-XXL's last hidden state (256 tokens) → (333, 4096); pooled =
CLIP-L ⊕ CLIP-G projected text embeddings → (2048,). No attention masks, as in both."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

CLIP_TOKENS = 77
T5_TOKENS = 256
DEFAULT_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed "
    "photo - realistic maximum detail, 32k, Color Grading, ultra HD, extrememeticulous detailing, "
    "skin pore detailing, hyper sharpness, perfect without deformations.")  # official test script


@dataclasses.dataclass
class TextEncoders:
    """The tokenizers and encoders of an SD3 diffusers folder."""

    tokenizers: tuple[Any, Any, Any]  # CLIPTokenizer ×2, T5TokenizerFast
    encoders: tuple[Any, Any, Any]    # CLIPTextModelWithProjection ×2, T5EncoderModel


def load_text_encoders(sd3_dir: str | os.PathLike, device: str = "cpu", dtype: Any = None
                       ) -> TextEncoders:
    """Loads ``tokenizer{,_2,_3}/`` and ``text_encoder{,_2,_3}/`` of an SD3 folder."""
    import torch
    from transformers import (
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

    root = Path(sd3_dir)
    dtype = dtype or torch.float32
    tokenizers = (CLIPTokenizer.from_pretrained(root / "tokenizer"),
                  CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
                  T5TokenizerFast.from_pretrained(root / "tokenizer_3"))
    encoders = tuple(cls.from_pretrained(root / sub, dtype=dtype).to(device).eval()
                     for cls, sub in ((CLIPTextModelWithProjection, "text_encoder"),
                                      (CLIPTextModelWithProjection, "text_encoder_2"),
                                      (T5EncoderModel, "text_encoder_3")))
    return TextEncoders(tokenizers, encoders)


def _ids(tokenizer: Any, prompts: list[str], length: int, device: Any) -> Any:
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                     add_special_tokens=True, return_tensors="pt").input_ids.to(device)


def encode_prompts(text: TextEncoders, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt_embeds (B, 333, D_t5), pooled_prompt_embeds (B, D_l + D_g))`` in float32."""
    import torch

    with torch.no_grad():
        hidden, pooled = [], []
        for tokenizer, encoder in zip(text.tokenizers[:2], text.encoders[:2]):
            out = encoder(_ids(tokenizer, prompts, CLIP_TOKENS, encoder.device),
                          output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        t5 = text.encoders[2]
        t5_hidden = t5(_ids(text.tokenizers[2], prompts, T5_TOKENS, t5.device))[0]
        clip = torch.cat([h.float() for h in hidden], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip, t5_hidden.float().to(clip.device)], dim=-2)
        pooled_embeds = torch.cat([p.float() for p in pooled], dim=-1)
    return embeds.cpu().numpy(), pooled_embeds.cpu().numpy()
