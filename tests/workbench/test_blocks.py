"""One block naming for every lens, resolved through the layout."""

import pytest

from workbench.blocks import block_of, block_order, family_of_keys, layer_block, layer_of, site_block
from workbench.errors import WorkbenchError

CHECKPOINTS = {
    "llama": (["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.11.mlp.up_proj.weight",
               "model.layers.3.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"],
              ["embed", "layer.0", "layer.11", "layer.3", "final_norm", "unembed"]),
    "gpt_neox": (["gpt_neox.embed_in.weight", "gpt_neox.layers.1.attention.dense.weight",
                  "gpt_neox.final_layer_norm.bias", "embed_out.weight"], ["embed", "layer.1", "final_norm", "unembed"]),
    "gpt2": (["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.2.attn.c_attn.weight",
              "transformer.ln_f.weight", "lm_head.weight"], ["embed", "embed", "layer.2", "final_norm", "unembed"]),
    "bert": (["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
              "bert.encoder.layer.5.output.dense.weight", "cls.predictions.bias"],
             ["embed", "embed", "layer.5", "unembed"]),
}


@pytest.mark.parametrize("family", list(CHECKPOINTS))
def test_parameter_names_resolve_through_the_layout(family):
    keys, want = CHECKPOINTS[family]
    assert [block_of(k, family) for k in keys] == want
    assert family_of_keys(keys).name == family
    assert [block_of(k, family_of_keys(keys)) for k in keys] == want


def test_without_a_layout_blocks_are_module_paths():
    assert block_of("trunk.blocks.2.fc.weight") == "trunk.blocks.2"
    assert block_of("head.weight") == "head"
    assert block_of("encoder.proj.out.bias", depth=2) == "encoder.proj"
    assert family_of_keys(["trunk.0.weight", "head.bias"]) is None


def test_order_sites_and_layers():
    assert block_order(["unembed", "layer.10", "other", "layer.2", "embed", "final_norm"]) == [
        "embed", "layer.2", "layer.10", "final_norm", "unembed", "other"]
    assert layer_block(3) == "layer.3" and layer_of("layer.3") == 3 and layer_of("embed") is None
    assert site_block("z.4") == "layer.4" and site_block("mlp_out.0") == "layer.0"
    assert site_block("embed") == "embed" and site_block("logits") == "unembed"
    with pytest.raises(WorkbenchError, match="unknown layout family 'gptx'"):
        block_of("a.b", "gptx")


def test_subject_blocks_match_checkpoint_blocks():
    """A Subject's parameters and the same model's state dict land in the same blocks."""
    import workbench

    lm = workbench.load("tasklm")
    from_subject = {block_of(n, lm.family) for n, _ in lm.model.named_parameters()}
    from_keys = {block_of(k, family_of_keys(lm.model.state_dict())) for k in lm.model.state_dict()}
    assert from_subject == {"embed", "layer.0", "layer.1", "final_norm", "unembed"} - ({"unembed"} - from_subject)
    assert from_subject <= from_keys and "other" not in from_keys
