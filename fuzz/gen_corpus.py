#!/usr/bin/env python3
"""Writes fuzz/corpus/gguf/tiny_model.gguf: a complete, very small LLaMA-family model (1 layer,
width 32, vocabulary 12 with a byte-level BPE tokenizer in the metadata, Q8_0 / Q4_1 / F16 / F32
tensors) for the GGUF fuzz target to mutate, so that mutations reach the model loader and the
tokenizer builder and not only the header. Run once: pip install gguf numpy && python3 fuzz/gen_corpus.py
"""
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, quants

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(7)
V, C, F, H, KV, HD = 12, 32, 64, 2, 1, 16


def main():
    path = os.path.join(HERE, "corpus", "gguf", "tiny_model.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(64)
    w.add_embedding_length(C)
    w.add_block_count(1)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = ["a", "b", "c", "Ġ", "ab", "Ġa", "bc", "<s>", "</s>", "Ċ", "d", "e"]
    w.add_token_list(tokens)
    w.add_token_types([1] * 7 + [3, 3] + [1] * 3)
    w.add_token_merges(["a b", "Ġ a", "b c"])
    w.add_bos_token_id(7)
    w.add_eos_token_id(8)

    def t(name, shape, ty):
        x = rng.standard_normal(shape).astype(np.float32) * 0.1
        if ty == Q.F32:
            w.add_tensor(name, x)
        elif ty == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, quants.quantize(x, ty), raw_dtype=ty)

    t("token_embd.weight", (V, C), Q.Q8_0)
    t("output_norm.weight", (C,), Q.F32)
    t("blk.0.attn_norm.weight", (C,), Q.F32)
    t("blk.0.ffn_norm.weight", (C,), Q.F32)
    t("blk.0.attn_q.weight", (H * HD, C), Q.Q4_1)
    t("blk.0.attn_k.weight", (KV * HD, C), Q.Q4_1)
    t("blk.0.attn_v.weight", (KV * HD, C), Q.F16)
    t("blk.0.attn_output.weight", (C, H * HD), Q.Q4_1)
    t("blk.0.ffn_gate.weight", (F, C), Q.Q8_0)
    t("blk.0.ffn_up.weight", (F, C), Q.Q8_0)
    t("blk.0.ffn_down.weight", (C, F), Q.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
