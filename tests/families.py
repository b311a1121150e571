"""Tiny random models of the causal-LM families spinlab is tested on, built from configs in code.

Every family gets 2 layers, hidden size 64 and 2 attention heads of 32 (vLLM's CPU attention takes
head sizes of 32 and up), over the character tokenizer of `spinlab.models.char_tokenizer`. The
output layer's weights are scaled up (and Phi's output bias drawn at random) so that the logits
are as large as a trained checkpoint's and the soft-cap, the scales and the bias change them.

`SUPPORT` is what the support table of docs/model-families.md says for each family;
tests/test_families.py checks each cell against the family's behaviour, and the table against
`SUPPORT`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

from spinlab.models import char_tokenizer

SIZE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
}
WINDOW = 32  # sliding windows shorter than the data's sequences, so that they take effect
MOE = {"num_experts_per_tok": 2}

# name: (config class, settings beyond SIZE, what sets its output path apart)
FAMILIES: dict[str, tuple[type, dict]] = {
    "Llama": (tf.LlamaConfig, {}),
    "Mistral": (tf.MistralConfig, {"sliding_window": WINDOW}),
    "Mixtral": (tf.MixtralConfig, {"sliding_window": WINDOW, "num_local_experts": 4, **MOE}),
    "Qwen2": (tf.Qwen2Config, {}),
    "Qwen3": (tf.Qwen3Config, {"head_dim": 32}),
    "Qwen3-MoE": (tf.Qwen3MoeConfig, {"head_dim": 32, "num_experts": 4, "moe_intermediate_size": 32, **MOE}),
    "Gemma": (tf.GemmaConfig, {"head_dim": 32}),
    "Gemma-2": (tf.Gemma2Config, {"head_dim": 32, "sliding_window": WINDOW, "final_logit_softcapping": 30.0}),
    "Gemma-3": (
        tf.Gemma3TextConfig,
        {
            "head_dim": 32,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "final_logit_softcapping": 30.0,
        },
    ),
    "Phi": (tf.PhiConfig, {}),
    "Phi-3": (tf.Phi3Config, {}),
    "Granite": (tf.GraniteConfig, {"logits_scaling": 8.0}),
    "Cohere": (tf.CohereConfig, {"logit_scale": 0.0625}),
    "OLMo-2": (tf.Olmo2Config, {}),
    "SmolLM3": (tf.SmolLM3Config, {}),
    "GPT-2": (tf.GPT2Config, {}),
}
SLIDING = {"Mistral", "Mixtral", "Gemma-2", "Gemma-3"}
MOE_FAMILIES = {"Mixtral", "Qwen3-MoE"}

# The support table of docs/model-families.md, row by row (its cells in order of SUPPORT_COLUMNS).
SUPPORT_COLUMNS = (
    "output layer",
    "log-probs",
    "training",
    "hf",
    "static",
    "vllm",
    "sharding",
    "LoRA targets",
)
_LOOP_OR_WINDOW = "loop (window ≥ cache), else generate"
SUPPORT: dict[str, tuple[str, ...]] = {
    "Llama": ("plain", "yes", "yes", "yes", "loop", "yes", "yes", "q/k/v/o_proj"),
    "Mistral": ("plain", "yes", "yes", "yes", _LOOP_OR_WINDOW, "yes", "yes", "q/k/v/o_proj"),
    "Mixtral": ("plain", "yes", "yes", "yes", _LOOP_OR_WINDOW, "yes", "yes", "q/k/v/o_proj"),
    "Qwen2": ("plain", "yes", "yes", "yes", "loop", "yes", "yes", "q/k/v/o_proj"),
    "Qwen3": ("plain", "yes", "yes", "yes", "loop", "yes", "yes", "q/k/v/o_proj"),
    "Qwen3-MoE": ("plain", "yes", "yes", "yes", "loop", "yes", "yes", "q/k/v/o_proj"),
    "Gemma": ("plain", "yes", "yes", "yes", "loop", "yes", "yes", "q/k/v/o_proj"),
    "Gemma-2": ("soft-cap", "yes", "yes", "yes", _LOOP_OR_WINDOW, "yes", "yes", "q/k/v/o_proj"),
    "Gemma-3": ("soft-cap", "yes", "yes", "yes", _LOOP_OR_WINDOW, "yes", "yes", "q/k/v/o_proj"),
    "Phi": ("bias", "yes", "yes", "yes", "loop", "yes", "yes", "q/k/v_proj"),
    "Phi-3": ("plain", "yes", "yes", "yes", "loop", "yes", "yes", "qkv/o_proj"),
    "Granite": ("scale", "yes", "yes", "yes", "loop", "yes", "yes", "q/k/v/o_proj"),
    "Cohere": ("scale", "yes", "yes", "yes", "loop", "yes", "yes", "q/k/v/o_proj"),
    "OLMo-2": ("plain", "yes", "yes", "yes", "loop", "yes", "yes", "q/k/v/o_proj"),
    "SmolLM3": ("plain", "yes", "yes", "yes", "loop", "yes", "yes", "q/k/v/o_proj"),
    "GPT-2": ("plain", "yes", "yes", "yes", "loop", "yes", "yes", "c_attn"),
}


def family_config(name: str, **changes):
    """The family's tiny config over the character tokenizer; `changes` override its settings."""
    tokenizer = char_tokenizer()
    config_class, settings = FAMILIES[name]
    special = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if config_class is tf.GPT2Config:  # GPT-2 names its sizes its own way
        size = {"n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 512}
    else:
        size = dict(SIZE)
    return config_class(**size, **special, **{**settings, **changes})


def family_model(name: str, seed: int = 0, **changes) -> tf.PreTrainedModel:
    """A random model of the family with trained-sized logits (see the module doc), in eval mode."""
    config = family_config(name, **changes)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(20.0)
        if head.bias is not None:
            head.bias.copy_(torch.randn(head.bias.shape, generator=generator) * 2.0)
    return model.eval()


def save_family(name: str, path: Path, seed: int = 0, **changes) -> Path:
    """The family's model and the character tokenizer, saved as a Hugging Face directory."""
    model = family_model(name, seed, **changes)
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(path)
    tokenizer = char_tokenizer()
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(path)
    return path
