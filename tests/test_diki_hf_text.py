"""DIKI's prefixes in a Hugging Face text tower (components/methods/prefix_injection.py): the demo model's text tower
is the pretrained all-MiniLM-L6-v2, a BERT-style encoder whose self-attention hands its heads to a separate
out-projection. The expected values are the formula of docs/methods/diki.md ("Forward with a slot injected"),
computed by hand in forward hooks on the layers' own self-attention (an explicit softmax; no code of the method);
tolerance 1e-5 on fp32."""

from __future__ import annotations

import math

import pytest
import torch

from components.methods.base import MethodError
from components.methods.diki import new_slot
from components.methods.prefix_injection import block_width, injected, text_blocks


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config).eval()


def _by_hand(layers, prefix, weight):
    """Hooks that add w · softmax(q p_kᵀ/√h) p_v (heads concatenated) to each prefixed layer's self-attention."""
    handles = []
    for layer, rows in zip(layers, prefix):
        attn = layer.attention.self

        def hook(module, args, kwargs, output, rows=rows):
            x = args[0] if args else kwargs["hidden_states"]
            b, length, width = x.shape
            heads, size = module.num_attention_heads, width // module.num_attention_heads
            q = (x @ module.query.weight.T + module.query.bias).reshape(b, length, heads, size).transpose(1, 2)
            keys = rows[0].reshape(-1, heads, size).transpose(0, 1)  # [heads, P, size], the same for every sample
            values = rows[1].reshape(-1, heads, size).transpose(0, 1)
            extra = (q @ keys.transpose(-1, -2) / math.sqrt(size)).softmax(dim=-1) @ values * weight
            return (output[0] + extra.transpose(1, 2).reshape(b, length, width), *output[1:])

        handles.append(attn.register_forward_hook(hook, with_kwargs=True))
    return handles


def test_a_bert_layer_with_its_prefix_is_the_formula_with_padding_and_the_model_is_untouched():
    model = _tiny_bert()
    layers = text_blocks(_holder(model))
    assert layers == list(model.encoder.layer) and block_width(layers[0]) == 8
    ids = torch.tensor([[1, 5, 7, 9, 2], [1, 4, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # padding must still be masked in the layer's own part
    g = torch.Generator().manual_seed(3)
    prefix = torch.randn(2, 2, 4, 8, generator=g)  # the first 2 of 3 layers, 4 tokens
    weight = torch.tensor(0.4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        frozen = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with injected(layers, prefix, weight.reshape(1)):
            found = model(input_ids=ids, attention_mask=mask).last_hidden_state
        handles = _by_hand(layers, prefix, weight)
        try:
            expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()
    assert torch.allclose(found, expected, atol=1e-5)
    assert not torch.allclose(found, frozen, atol=1e-3)  # the prefix does act
    assert all(type(layer.attention.self).__name__ == "BertSelfAttention" for layer in layers)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def _holder(model):
    holder = torch.nn.Module()
    holder.text = torch.nn.Module()
    holder.text.transformer = model
    return holder


def test_the_demo_models_minilm_text_tower_takes_a_slot_and_zero_values_change_nothing():
    """The demo model (cliploop-minilm-tiny: the packaged pretrained MiniLM, 6 layers of width 384): a new slot
    (values zero) and a zero weight both give exactly the frozen text embedding; a trained-like slot does not."""
    import open_clip

    from components.model.backbones import register_builtin_configs

    register_builtin_configs()
    model = open_clip.create_model("cliploop-minilm-tiny", pretrained=None).eval()
    tokens = open_clip.get_tokenizer("cliploop-minilm-tiny")(["a photo of a cat", "a dog"])
    layers = text_blocks(model)
    assert len(layers) == 6 and block_width(layers[0]) == 384
    slot = new_slot(len(layers), 8, 384, torch.Generator().manual_seed(0))
    with torch.no_grad():
        frozen = model.encode_text(tokens)
        with injected(layers, slot, None):
            assert torch.allclose(model.encode_text(tokens), frozen, atol=1e-6)
        slot[:, 1].normal_(generator=torch.Generator().manual_seed(1))
        with injected(layers, slot, torch.zeros(1)):
            assert torch.allclose(model.encode_text(tokens), frozen, atol=1e-6)
        with injected(layers, slot, torch.ones(1)):
            assert not torch.allclose(model.encode_text(tokens), frozen, atol=1e-3)


def test_a_text_tower_of_no_attention_blocks_is_refused_in_one_line():
    holder = torch.nn.Module()
    holder.text = torch.nn.Module()
    for tower in (torch.nn.Linear(2, 2), _encoder_of(torch.nn.Linear(2, 2))):  # no encoder; layers of no attention
        holder.text.transformer = tower
        with pytest.raises(MethodError, match="^DIKI needs a text tower of attention blocks") as refused:
            text_blocks(holder)
        assert "\n" not in str(refused.value)


def _encoder_of(layer: torch.nn.Module) -> torch.nn.Module:
    tower = torch.nn.Module()
    tower.encoder = torch.nn.Module()
    tower.encoder.layer = torch.nn.ModuleList([layer])
    return tower
