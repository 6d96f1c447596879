#!/usr/bin/env python3
"""A Hugging Face folder with a real model's shape and random f32 weights, for speed benchmarks
(speed does not depend on the values; a GPU machine that cannot download gets the real shapes).

    python3 benches/random_model.py smollm2-135m|gemma3-270m|tiny OUT_DIR

smollm2-135m: SmolLM2-135M's configuration (llama; 30 layers, hidden 576, 9 heads / 3 kv,
MLP 1536, vocab 49152, rope theta 1e5, tied head). gemma3-270m: Gemma-3-270M's (gemma3_text;
18 layers, hidden 640, 4 heads / 1 kv of 256, MLP 2048, vocab 262144, a global layer every sixth,
window 512, rope 1e6 / 1e4, tied head). Needs torch and transformers.
"""
import sys

import torch
import transformers

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
