"""Tiny random causal LMs of every tested architecture, built in memory (no downloads).

Shapes are chosen to be awkward on purpose: hidden sizes that are not multiples of the
usual group sizes, so partial groups and odd packing run in every test that uses them.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=96,
    intermediate_size=200,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    max_position_embeddings=256,
)
EXTRA = {
    "llama": {"tie_word_embeddings": True},
    "mistral": {"sliding_window": 16},
    "qwen2": {},
    "qwen3": {},
    "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "gemma": {},
    "gemma2": {"sliding_window": 16, "query_pre_attn_scalar": 24},
}
ARCHITECTURES = tuple(EXTRA)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random ``model_type`` causal LM in float32, eval mode."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**COMMON, **EXTRA[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; widen it so quantization errors show
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.05)
    return model.eval()


def tiny_tokens(samples: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (samples, length), generator=generator)
