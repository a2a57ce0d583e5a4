"""TextEncoder against HF's CLIPTokenizer + CLIPTextModel, the path the released Würstchen v2 models were conditioned
through (``padding="max_length"``, ``attention_mask``, ``last_hidden_state``), with a tiny random text tower."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from wuerstchen.data.cached import CLIP, check_cache_matches  # noqa: E402
from wuerstchen.models.text_encoder import TextEncoder  # noqa: E402

# "!" is id 0 where no merge takes it ("!$"), a real token the old `tokens == 0` rule masked as a pad
CAPTIONS = ["a red circle in the top left", "hello !$ world", "", "a photo of " + "many " * 100 + "cats"]
EOT = 49407


def hf_tokenizer(root: Path) -> transformers.CLIPTokenizer:
    """HF's CLIPTokenizer on open_clip's shipped BPE: open_clip's vocabulary order, HF's special-token names, padding
    with ``<|endoftext|>`` as the LAION ViT-H / ViT-bigG tokenizers do."""
    import open_clip.tokenizer as oc

    encoder = oc.SimpleTokenizer().encoder
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in encoder.items()}
    (root / "vocab.json").write_text(json.dumps(vocab))
    merges = gzip.open(oc.default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]  # as open_clip
    (root / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    return transformers.CLIPTokenizer.from_pretrained(str(root), pad_token="<|endoftext|>")


def hf_text_model(encoder: TextEncoder) -> transformers.CLIPTextModel:
    """An HF CLIPTextModel of the open_clip tower's shape holding the same weights (q, k, v split from in_proj)."""
    text = encoder.text
    width, heads = text.transformer.width, text.transformer.resblocks[0].attn.num_heads
    config = transformers.CLIPTextConfig(
        vocab_size=text.token_embedding.num_embeddings, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=len(text.transformer.resblocks), num_attention_heads=heads,
        max_position_embeddings=text.positional_embedding.shape[0], hidden_act="gelu", layer_norm_eps=1e-5,
        attn_implementation="eager")
    theirs = {"embeddings.token_embedding.weight": text.token_embedding.weight,
              "embeddings.position_embedding.weight": text.positional_embedding,
              "final_layer_norm.weight": text.ln_final.weight, "final_layer_norm.bias": text.ln_final.bias}
    for i, block in enumerate(text.transformer.resblocks):
        layer = f"encoder.layers.{i}."
        for name, weight, bias in zip("qkv", block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)):
            proj = layer + f"self_attn.{name}_proj"
            theirs.update({proj + ".weight": weight, proj + ".bias": bias})
        for ours, hf in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            module = block.get_submodule(ours)
            theirs.update({layer + hf + ".weight": module.weight, layer + hf + ".bias": module.bias})
    model = transformers.CLIPTextModel(config).eval()
    inner = getattr(model, "text_model", model)  # transformers 4 nests the tower, 5 does not
    missing, unexpected = inner.load_state_dict(theirs, strict=False)
    assert not unexpected and all("position_ids" in key for key in missing), (missing, unexpected)
    return model


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    """The tiny tower with its layer norms perturbed too (open_clip initialises them to 1 and 0)."""
    encoder = TextEncoder("wuerstchen-tiny-text", pad_token="eot")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in encoder.text.named_parameters():
            if "ln_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return encoder


def test_eot_padding_gives_hf_tokenizer_ids_and_hf_states_at_all_77_positions(encoder: TextEncoder,
                                                                              tmp_path: Path) -> None:
    hf = hf_tokenizer(tmp_path)(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    tokens = encoder.tokenize(CAPTIONS)
    assert torch.equal(tokens, hf["input_ids"])
    assert tokens[1, :7].tolist() == [49406, 3306, 0, 259, 1002, EOT, EOT]  # "hello", "!", "$</w>", "world"
    assert torch.equal(~encoder.pads(tokens), hf["attention_mask"].bool())
    assert tokens[3, -1] == EOT and not encoder.pads(tokens)[3].any()  # truncated: no pads at all

    with torch.no_grad():
        expected = hf_text_model(encoder)(input_ids=hf["input_ids"], attention_mask=hf["attention_mask"])
    states = encoder.encode_tokens(tokens)
    assert states.shape == (4, 77, 32)
    torch.testing.assert_close(states, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    # without the mask the pads attend to each other and differ from HF's states
    causal_only = TextEncoder.from_record(dict(encoder.config, padding_mask=False))
    causal_only.load_state_dict(encoder.state_dict())
    assert (causal_only.encode_tokens(tokens)[0, 10:] - states[0, 10:]).abs().max() > 1e-2


def test_zero_padding_keeps_the_old_states_and_the_real_tokens_match_eot_padding(encoder: TextEncoder) -> None:
    zero = TextEncoder.from_record(dict(encoder.config, pad_token="zero"))
    zero.load_state_dict(encoder.state_dict())
    captions = CAPTIONS[:1] + CAPTIONS[2:]  # no lone "!": the old rule masked every 0
    tokens, eot_tokens = zero.tokenize(captions), encoder.tokenize(captions)
    assert torch.equal(tokens, zero.tokenizer(captions))  # open_clip's own ids
    assert torch.equal(zero.pads(tokens), zero.pads(eot_tokens))
    assert torch.equal(tokens.masked_fill(zero.pads(tokens), EOT), eot_tokens)

    states = zero.encode_tokens(tokens)
    text = zero.text  # the old rule: keys masked where the token is 0, with the causal mask
    old_mask = text.attn_mask[None] + torch.zeros(tokens.shape).masked_fill(tokens == 0, float("-inf"))[:, None]
    with torch.no_grad():
        x = text.token_embedding(tokens) + text.positional_embedding
        old = text.ln_final(text.transformer(x, attn_mask=old_mask.repeat_interleave(2, dim=0)))
    torch.testing.assert_close(states, old, atol=1e-6, rtol=1e-6)

    eot_states = encoder.encode_tokens(eot_tokens)
    real = ~zero.pads(tokens)  # (B, 77)
    torch.testing.assert_close(states[real], eot_states[real], atol=1e-6, rtol=1e-6)
    assert (states[~real] - eot_states[~real]).abs().amax(dim=-1).min() > 1e-3  # every pad position changes


def test_records_without_pad_token_are_zero_padded_and_new_records_round_trip(encoder: TextEncoder) -> None:
    old_record = dict(model_name="wuerstchen-tiny-text", pretrained=None, padding_mask=True, seed=0)
    rebuilt = TextEncoder.from_record(old_record)
    assert rebuilt.pad_token == "zero" and rebuilt.config == dict(old_record, pad_token="zero")
    assert rebuilt.tokenize(["a"])[0, 3:].eq(0).all()
    assert TextEncoder.from_record(encoder.config).config == encoder.config
    assert TextEncoder().config["pad_token"] == "eot"  # the released models' padding is the default
    with pytest.raises(ValueError, match="pad_token='pad'"):
        TextEncoder("wuerstchen-tiny-text", pad_token="pad")


def test_hydra_text_encoder_configs_pad_with_eot_and_mask() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = Path(__file__).parents[2] / "configs" / "model" / "text_encoder"
    for name in ("vit_h", "vit_bigg", "tiny"):
        cfg = OmegaConf.load(root / f"{name}.yaml")
        assert (cfg.pad_token, cfg.padding_mask) == ("eot", True), name
    tiny = instantiate(OmegaConf.load(root / "tiny.yaml"))
    assert tiny.config["pad_token"] == "eot" and tiny.tokenize(["a"])[0, 3:].eq(EOT).all()


def test_a_cache_padded_otherwise_is_refused(encoder: TextEncoder) -> None:
    old_record = {k: v for k, v in encoder.config.items() if k != "pad_token"}  # a cache from before the option
    with pytest.raises(ValueError, match=r"pad_token=zero.*stage\.text_encoder pads with pad_token=eot.*"
                                         r"stage\.text_encoder\.pad_token=zero"):
        check_cache_matches({"arrays": {CLIP: [77, 32]}, "text_encoder": old_record}, encoder, [CLIP])
    zero = TextEncoder.from_record(old_record)
    check_cache_matches({"arrays": {CLIP: [77, 32]}, "text_encoder": old_record}, zero, [CLIP])  # same padding
    check_cache_matches({"arrays": {CLIP: [77, 32]}, "text_encoder": encoder.config}, encoder, [CLIP])
    with pytest.raises(ValueError, match="pad_token=eot, this run's stage.text_encoder pads with pad_token=zero"):
        check_cache_matches({"arrays": {CLIP: [77, 32]}, "text_encoder": encoder.config}, zero, [CLIP])
    with pytest.raises(ValueError, match="is not this run's stage.text_encoder"):  # other differences still refused
        check_cache_matches({"arrays": {CLIP: [77, 32]}, "text_encoder": dict(encoder.config, seed=1)}, encoder,
                            [CLIP])
