#!/usr/bin/env python3
"""A Hugging Face folder with a real model's shape and random f32 weights, for speed benchmarks
(speed does not depend on the values; a GPU machine that cannot download gets the real shapes).

    python3 benches/random_model.py NAME OUT_DIR

NAME: tiny, smollm2-135m, gemma3-270m, or the sizes people fine-tune: qwen3-0.6b, qwen3-1.7b,
qwen3-4b, llama3.2-1b, llama3.2-3b, gemma3-1b, gemma3-4b (the text model of Gemma-3-4B), each with
its published configuration (f32 on disk: 4 bytes a parameter, 16 GB for the 4B).

smollm2-135m: SmolLM2-135M's configuration (llama; 30 layers, hidden 576, 9 heads / 3 kv,
MLP 1536, vocab 49152, rope theta 1e5, tied head). gemma3-270m: Gemma-3-270M's (gemma3_text;
18 layers, hidden 640, 4 heads / 1 kv of 256, MLP 2048, vocab 262144, a global layer every sixth,
window 512, rope 1e6 / 1e4, tied head). Needs torch and transformers.
"""
import sys

import torch
import transformers

# Qwen3: 8 kv heads of 128, vocab 151,936, rope 1e6, tied head (0.6B–4B).
QWEN3 = dict(model_type="qwen3", num_key_value_heads=8, head_dim=128, vocab_size=151936,
             max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
             hidden_act="silu")
# Llama 3.2 1B / 3B: 8 kv heads, MLP 8192, vocab 128,256, rope 5e5 with llama3 scaling, tied head.
LLAMA32 = dict(model_type="llama", intermediate_size=8192, num_key_value_heads=8, vocab_size=128256,
               max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
               hidden_act="silu", rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def gemma3(layers, window, scaling):
    """Gemma 3's text model: kv heads of 256, a global layer every sixth (rope 1e6, linearly scaled by
    `scaling` in 4B+), sliding ones (rope 1e4) of `window` tokens, tied head."""
    full = {"rope_type": "default", "rope_theta": 1e6}
    if scaling:
        full = {"rope_type": "linear", "factor": scaling, "rope_theta": 1e6}
    return dict(model_type="gemma3_text", num_hidden_layers=layers, head_dim=256, rms_norm_eps=1e-6,
                sliding_window=window, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
                tie_word_embeddings=True,
                layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
                rope_parameters={"full_attention": full,
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})


CONFIGS = {
    # For trying the benchmark scripts on a machine without a GPU.
    "tiny": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True),
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu"),
    "gemma3-270m": dict(
        model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
        max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=512, query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    # The sizes people fine-tune (issue 30), with their published configurations.
    "qwen3-0.6b": dict(QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16),
    "qwen3-1.7b": dict(QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16),
    "qwen3-4b": dict(QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32),
    "llama3.2-1b": dict(LLAMA32, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, head_dim=64),
    "llama3.2-3b": dict(LLAMA32, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128),
    "gemma3-1b": dict(gemma3(26, window=512, scaling=None), hidden_size=1152, intermediate_size=6912,
                      num_attention_heads=4, num_key_value_heads=1, vocab_size=262144,
                      max_position_embeddings=32768),
    "gemma3-4b": dict(gemma3(34, window=1024, scaling=8.0), hidden_size=2560, intermediate_size=10240,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=262208,
                      max_position_embeddings=131072),
}


def main():
    name, out = sys.argv[1], sys.argv[2]
    kw = dict(CONFIGS[name])
    config = transformers.AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    print(f"{out}: {name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, random f32")


if __name__ == "__main__":
    main()
