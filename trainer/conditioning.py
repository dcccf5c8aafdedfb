"""What the UNet is conditioned on: prompt embeddings and, for SDXL, size/crop time ids."""

from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the text encoder's 77 positions (longer captions are truncated)."""
    max_length = min(int(tokenizer.model_max_length), 77)
    return tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(arch: str, text_encoders: list, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings (and SDXL's pooled embedding) as the SD1.x / SDXL UNet expects them.

    SD1.x uses the last hidden state of CLIP-L. SDXL concatenates the penultimate hidden
    states of both encoders and adds the second encoder's projected pooled output.
    """
    if arch == "sd1":
        return text_encoders[0](token_ids[0])[0], None
    states = []
    pooled = None
    for encoder, ids in zip(text_encoders, token_ids):
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return torch.cat(states, dim=-1), pooled


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                  target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning: (orig h, orig w, crop top, crop left, target h, target w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
