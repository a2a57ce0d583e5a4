"""Pure key maps between the released (dome272) layout, which our networks use, and the diffusers port.

The layouts differ only in attention and Stage A's codebook (arXiv 2306.00637): each fused
``...attention.attn.in_proj_{weight,bias}`` is diffusers' ``...attention.to_{q,k,v}.*`` stacked along dim 0 in q, k, v
order, ``...attention.attn.out_proj.*`` is ``...attention.to_out.0.*``, and ``vquantizer.codebook.weight`` is
``vquantizer.embedding.weight``.
"""

from __future__ import annotations

import torch

StateDict = dict[str, torch.Tensor]

_CODEBOOK = ("vquantizer.codebook.weight", "vquantizer.embedding.weight")


def released_to_diffusers(state: StateDict) -> StateDict:
    """Our / the released layout -> diffusers' (fused attention projections split into q, k, v)."""
    out: StateDict = {}
    for key, value in state.items():
        if ".attention.attn.in_proj_" in key:
            prefix, kind = key.split(".attn.in_proj_")  # kind: "weight" or "bias"
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{kind}"] = part.clone()
        elif ".attention.attn.out_proj." in key:
            out[key.replace(".attention.attn.out_proj.", ".attention.to_out.0.")] = value
        elif key == _CODEBOOK[0]:
            out[_CODEBOOK[1]] = value
        else:
            out[key] = value
    return out


def diffusers_to_released(state: StateDict) -> StateDict:
    """diffusers' layout -> ours / the released one (q, k, v fused into ``in_proj``)."""
    out: StateDict = {}
    for key, value in state.items():
        if ".attention.to_q." in key:
            prefix, kind = key.split(".to_q.")
            parts = [state.get(f"{prefix}.{name}.{kind}") for name in ("to_q", "to_k", "to_v")]
            if any(p is None for p in parts):
                raise KeyError(f"{prefix}: diffusers attention needs to_q, to_k and to_v {kind}s")
            out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        elif ".attention.to_k." in key or ".attention.to_v." in key:
            continue  # folded into in_proj with to_q
        elif ".attention.to_out.0." in key:
            out[key.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = value
        elif key == _CODEBOOK[1]:
            out[_CODEBOOK[0]] = value
        else:
            out[key] = value
    return out


def is_diffusers_layout(state: StateDict) -> bool:
    return any(".attention.to_q." in k for k in state) or _CODEBOOK[1] in state


def strip_prefixes(state: StateDict, prefixes: tuple[str, ...] = ("module.", "_orig_mod.")) -> StateDict:
    """Drop wrapper prefixes left by DDP (``module.``) and torch.compile (``_orig_mod.``)."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def detect_stage(state: StateDict) -> str | None:
    """Which network a state dict holds, from its characteristic keys: "a", "b", "c", "effnet" or None."""
    keys = set(state)
    if any(k.startswith("vquantizer.") for k in keys):
        return "a"
    if "clip_mapper.weight" in keys and any(k.startswith("effnet_mappers.") for k in keys):
        return "b"
    if "projection.weight" in keys and any(k.startswith("cond_mapper.") for k in keys):
        return "c"
    if "mapper.0.weight" in keys and any(k.startswith("backbone.") for k in keys):
        return "effnet"
    return None
