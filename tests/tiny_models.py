"""Small random HF checkpoints of each supported variant, written as safetensors folders."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# name -> (config class, kwargs); shapes chosen so GQA ratios 1, 3 and 4 all appear.
VARIANTS = {
    "llama31_tied_gqa4": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_SCALING,
            tie_word_embeddings=True,
        ),
    ),
    # Untied: with random weights a tied LM head mostly echoes the input token, so greedy
    # outputs of tied models barely depend on attention; comparisons of backends use this one.
    "llama3_untied_gqa4": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        ),
    ),
    "llama2_untied_mha": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
    ),
    "llama_gqa3": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=6,
            num_key_value_heads=2,
            hidden_size=48,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2_bias": (
        transformers.Qwen2Config,
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
    ),
}


def make_tiny(
    name: str,
    folder: Path,
    *,
    max_shard_size: str | None = None,
    seed: int = 0,
    num_hidden_layers: int = 3,
):
    """Save a random model of variant `name` to `folder`; returns the torch model (eval mode)."""
    cls, kwargs = VARIANTS[name]
    kwargs = dict(kwargs)
    kwargs.setdefault("head_dim", 8)
    kwargs.setdefault("hidden_size", 64)
    config = cls(
        vocab_size=256,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        **kwargs,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF zero-inits biases; random ones make the bias path observable
        for name_, p in model.named_parameters():
            if name_.endswith("bias"):
                p.normal_(0, 0.5)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kw)
    return model
