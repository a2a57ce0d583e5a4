"""Frozen open_clip text tower: the final layer's token states after ``ln_final`` (arXiv 2306.00637)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from open_clip.model import _build_text_tower
from torch import nn

from .compressor import _load_state_dict

log = logging.getLogger(__name__)

# Tiny text tower for tests and the CPU demo ("wuerstchen-tiny-text", width 32); registered on import.
open_clip.add_model_config(Path(__file__).parent / "open_clip_configs")

_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def text_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower's weights from a full open_clip checkpoint (``CLIP`` or ``CustomTextCLIP`` layout)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("text.") for k in state):
        return {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
    return {k: v for k, v in state.items() if k.startswith(_TEXT_PREFIXES)}


def _resolve_weights(model_name: str, pretrained: str) -> str:
    """A local file as it is, else an open_clip pretrained tag, downloaded (and cached) by open_clip."""
    if os.path.isfile(pretrained):
        return pretrained
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise FileNotFoundError(
            f"text encoder weights {pretrained!r}: not a file, and not a pretrained tag of {model_name!r} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(model_name)})")
    return open_clip.download_pretrained(cfg)


class TextEncoder(nn.Module):
    """Frozen CLIP text encoder returning all 77 token states after ``ln_final`` (HF's ``last_hidden_state``).

    Only the text tower is built (ViT-bigG's 1.8 B-parameter vision tower never is).

    Args:
        model_name: open_clip architecture: ``ViT-H-14`` (Stage B, the paper's Stage C; width 1024),
            ``ViT-bigG-14`` (released v2 Stage C; width 1280), or ``wuerstchen-tiny-text`` for tests.
        pretrained: an open_clip tag (``laion2b_s32b_b79k``; needs the network once) or a local checkpoint file;
            None keeps a random initialisation drawn from ``seed`` (tests, the CPU demo), so every process that
            builds the same encoder gets the same weights and training and sampling see the same conditioning.
        padding_mask: let positions after the end token attend to the real tokens only, as HF's CLIPTextModel
            called with the attention mask did for the released models; off gives open_clip's causal-only states.
    """

    def __init__(self, model_name: str = "ViT-H-14", pretrained: str | None = None, padding_mask: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        config = open_clip.get_model_config(model_name)
        if config is None:
            raise ValueError(f"unknown open_clip model {model_name!r}; known: {open_clip.list_models()}")
        self.model_name = model_name
        self.padding_mask = padding_mask
        self.config = dict(model_name=model_name, pretrained=pretrained, padding_mask=padding_mask, seed=seed)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.text = _build_text_tower(config["embed_dim"], config["text_cfg"],
                                          quick_gelu=config.get("quick_gelu", False))
        if pretrained is not None:
            path = _resolve_weights(model_name, pretrained)
            self.text.load_state_dict(text_state_dict(_load_state_dict(path)), strict=True)
            log.info("text encoder %s: weights from %s", model_name, path)
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        return self.text.transformer.width

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # frozen: no dropout, whatever the trainer asks

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions))  # (B, 77) int64, 0 = padding

    def _attention_mask(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive (L, L) causal mask, or (B * heads, L, L) with padded keys masked as well."""
        causal = self.text.attn_mask.to(device=tokens.device, dtype=dtype)  # (L, L), -inf above the diagonal
        if not self.padding_mask:
            return causal
        pad = torch.zeros(tokens.shape, dtype=dtype, device=tokens.device).masked_fill(tokens == 0, float("-inf"))
        mask = causal[None] + pad[:, None, :]  # (B, L, L)
        heads = self.text.transformer.resblocks[0].attn.num_heads
        return mask.repeat_interleave(heads, dim=0)

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 77) -> token states (B, 77, width)."""
        x = self.text.token_embedding(tokens) + self.text.positional_embedding
        x = self.text.transformer(x, attn_mask=self._attention_mask(tokens, x.dtype))
        return self.text.ln_final(x)

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(captions).to(self.text.positional_embedding.device)
        return self.encode_tokens(tokens)
