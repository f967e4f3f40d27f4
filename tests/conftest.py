"""Shared fixtures: tiny random models of every layout family, and the zoo models.

Everything runs offline: the hub is switched off before transformers is imported.
"""

from __future__ import annotations

import os

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
# one torch thread per test worker (and per notebook kernel it starts): the workers share the cores
os.environ.setdefault("WORKBENCH_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# family label -> (config class name, kwargs, model class name)
TINY = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_embd=32, n_head=4, n_positions=64), "GPT2LMHeadModel"),
    "gpt_neox": ("GPTNeoXConfig", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=64), "GPTNeoXForCausalLM"),
    "llama": ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=64, max_position_embeddings=64), "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                                  intermediate_size=64, max_position_embeddings=64), "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, max_position_embeddings=64), "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=8, intermediate_size=64, max_position_embeddings=64), "Gemma2ForCausalLM"),
    "bert": ("BertConfig", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64), "BertForMaskedLM"),
}
FAMILY_OF = {"gpt2": "gpt2", "gpt_neox": "gpt_neox", "llama": "llama", "qwen2": "llama", "mistral": "llama",
             "gemma2": "gemma2", "bert": "bert"}


@pytest.fixture(scope="session")
def word_tokenizer():
    from workbench.data import vocabulary
    from workbench.zoo.tokenizer import build_word_tokenizer

    return build_word_tokenizer(vocabulary())


def make_tiny(arch: str, tokenizer, seed: int = 0):
    """A tiny randomly initialised HF model of ``arch`` (eager attention), in eval mode."""
    import transformers

    cfg_name, kwargs, model_name = TINY[arch]
    cfg = getattr(transformers, cfg_name)(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2,
                                          eos_token_id=2, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)._from_config(cfg, attn_implementation="eager")
    return model.eval()


@pytest.fixture(params=list(TINY))
def tiny(request, word_tokenizer):
    """(arch, Subject) for each tiny architecture."""
    from workbench import from_model

    return request.param, from_model(make_tiny(request.param, word_tokenizer), word_tokenizer, name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def tasklm():
    import workbench

    return workbench.load("tasklm", device="cpu")


@pytest.fixture(scope="session")
def minilm():
    import workbench

    return workbench.load("minilm", device="cpu")


PROMPTS = ["hot -> cold ; big ->", "the keys near the cabinet", "France -> Paris ; Japan -> Tokyo ; Peru ->"]
