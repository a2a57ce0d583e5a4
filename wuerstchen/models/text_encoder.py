"""Frozen open_clip text tower: the final layer's token states after ``ln_final`` (arXiv 2306.00637)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import open_clip
import torch
from open_clip.model import _build_text_tower
from torch import nn

from .compressor import _load_state_dict

log = logging.getLogger(__name__)

# Tiny text tower for tests and the CPU demo ("wuerstchen-tiny-text", width 32); registered on import.
open_clip.add_model_config(Path(__file__).parent / "open_clip_configs")

_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")

PadToken = Literal["eot", "zero"]
PAD_TOKENS = get_args(PadToken)
# What a recorded config without ``pad_token`` (checkpoints and caches from before the option) was made with.
LEGACY_PAD_TOKEN: PadToken = "zero"


def complete_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded ``TextEncoder.config`` with the keys older records lack filled in as those records were made."""
    return {"pad_token": LEGACY_PAD_TOKEN, **record}


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

    Only the text tower is built (ViT-bigG's 1.8 B-parameter vision tower never is). The released Würstchen v2
    priors and decoders were conditioned through HF's ``CLIPTokenizer(padding="max_length", max_length=77,
    truncation=True)`` and ``CLIPTextModel(ids, attention_mask=mask).last_hidden_state`` (dome272/Wuerstchen and
    Stability-AI/StableCascade pipelines; diffusers' WuerstchenPriorPipeline). The LAION tokenizers pad with
    ``<|endoftext|>`` (49407), and Stages B and C attend to all 77 states unmasked, so the pad positions' states are
    part of the conditioning: ``pad_token="eot"`` with ``padding_mask`` gives those states at every position.

    Args:
        model_name: open_clip architecture: ``ViT-H-14`` (Stage B, the paper's Stage C; width 1024),
            ``ViT-bigG-14`` (released v2 Stage C; width 1280), or ``wuerstchen-tiny-text`` for tests.
        pretrained: an open_clip tag (``laion2b_s32b_b79k``; needs the network once) or a local checkpoint file;
            None keeps a random initialisation drawn from ``seed`` (tests, the CPU demo), so every process that
            builds the same encoder gets the same weights and training and sampling see the same conditioning.
        padding_mask: let no position attend to the positions after the first end token (the pads), as HF's
            CLIPTextModel called with the attention mask did for the released models; off gives open_clip's
            causal-only states. The real tokens' states are the same either way (causal: they never see a pad).
        pad_token: the id written after the end token: ``"eot"`` the end token itself (49407), as HF's LAION
            tokenizers pad; ``"zero"`` open_clip's 0, which checkpoints and caches from before this option used
            (:meth:`from_record` rebuilds those).
    """

    def __init__(self, model_name: str = "ViT-H-14", pretrained: str | None = None, padding_mask: bool = True,
                 pad_token: PadToken = "eot", seed: int = 0) -> None:
        super().__init__()
        config = open_clip.get_model_config(model_name)
        if config is None:
            raise ValueError(f"unknown open_clip model {model_name!r}; known: {open_clip.list_models()}")
        if pad_token not in PAD_TOKENS:
            raise ValueError(f"pad_token={pad_token!r}: one of {PAD_TOKENS}")
        self.model_name = model_name
        self.padding_mask = padding_mask
        self.pad_token = pad_token
        self.config = dict(model_name=model_name, pretrained=pretrained, padding_mask=padding_mask,
                           pad_token=pad_token, seed=seed)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.eot_id = int(self.tokenizer.eot_token_id)
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

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "TextEncoder":
        """The encoder a checkpoint's ``text_encoders`` or a cache's ``text_encoder`` entry records; records without
        ``pad_token`` predate it and were made with zero padding."""
        return cls(**complete_record(record))

    @property
    def width(self) -> int:
        return self.text.transformer.width

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # frozen: no dropout, whatever the trainer asks

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, 77) int64: start token, caption (truncated to 75), end token, then ``pad_token`` ids."""
        tokens = self.tokenizer(list(captions))  # open_clip pads with 0
        if self.pad_token == "eot":
            tokens = tokens.masked_fill(self.pads(tokens), self.eot_id)
        return tokens

    def pads(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) bool, true after each row's first end token (HF's ``attention_mask == 0``); a pad id may be the
        end token itself or 0, which is also a real token ("!"), so neither id alone marks the pads."""
        is_end = tokens == self.eot_id
        first_end = is_end.int().argmax(dim=1, keepdim=True)  # (B, 1)
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]  # (1, L)
        return (positions > first_end) & is_end.any(dim=1, keepdim=True)

    def _attention_mask(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive (L, L) causal mask, or (B * heads, L, L) with padded keys masked as well."""
        causal = self.text.attn_mask.to(device=tokens.device, dtype=dtype)  # (L, L), -inf above the diagonal
        if not self.padding_mask:
            return causal
        pad = torch.zeros(tokens.shape, dtype=dtype, device=tokens.device).masked_fill(self.pads(tokens),
                                                                                       float("-inf"))
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


def recorded_text_encoder(path: Any, name: str = "text_encoder") -> dict[str, Any] | None:
    """The ``TextEncoder`` config a training checkpoint of ours at ``path`` records under ``name`` (completed as
    :func:`complete_record` does), or None: released weights, exports and diffusers folders record none, and no
    ``path`` records nothing (a config node whose checkpoint is not set). ``path`` may be an open
    ``wuerstchen.weights.CheckpointFile``."""
    from ..weights import open_checkpoint  # the weights package imports the networks

    if not path:
        return None
    recorded = open_checkpoint(path).text_encoder_record(name)
    return None if recorded is None else complete_record(recorded)


def text_encoder_for(path: str | os.PathLike, fallback: Mapping[str, Any], pretrained: str | None = None,
                     name: str = "text_encoder") -> TextEncoder:
    """The text encoder a training checkpoint of ours at ``path`` records under ``name`` (fine-tuning our own prior
    keeps the conditioning it trained with), else ``fallback`` (released weights and exports record none).

    ``pretrained`` replaces the recorded weights' location (a hub tag recorded on one cluster, a local file on
    another); the architecture and tokenisation stay as recorded.
    """
    recorded = recorded_text_encoder(path, name)
    if recorded is None:
        record, source = dict(fallback), "the config's fallback (the weights record no text encoder)"
    else:
        record, source = recorded, f"recorded in {path}"
    if pretrained is not None:
        record["pretrained"] = pretrained
    log.info("text encoder %s (%s)", record.get("model_name"), source)
    return TextEncoder(**record)
