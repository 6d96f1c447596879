#!/usr/bin/env python3
"""Training speed of portalora next to PyTorch + PEFT, same model, method, batch and sequence,
on the same machine in the same run.

    python3 benches/compare.py --model HF_FOLDER|FILE.gguf [--method lora] [--rank 8] [--batch 4]
                               [--seq 128] [--steps 8] [--warmup 3] [--targets q_proj,...]
                               [--base-dtype auto] [--portalora PATH] [--torch f32,bf16]

A GGUF model is loaded by transformers dequantized to f32; portalora keeps it as stored unless
--base-dtype f32 (its default, auto, is the QLoRA-style quantized base).

Needs torch, transformers and peft (it is not part of the test suite). PyTorch runs on CUDA when
it sees a GPU, else on the CPU. Both sides train on the same random token ids with AdamW; each
reports the median tokens/s of the steps after --warmup. --torch f32,bf16 also times PyTorch
with bf16 autocast (f32 weights, bf16 matrix products), the mixed precision PyTorch users train
with on a GPU. The last line is one JSON object: {"method", "batch", "seq",
"portalora_tokens_per_s", "peft_tokens_per_s", "ratio", "device"} (PyTorch f32), plus
"peft_bf16_tokens_per_s" and "ratio_bf16" with bf16.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

LLAMA = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
GPT2 = "c_attn,c_proj,c_fc"


def portalora_speed(a, ids_path, targets):
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.jsonl")
        cmd = [a.portalora, "train", "--model", a.model, "--ids", ids_path, "--method", a.method,
               "--rank", str(a.rank), "--alpha", str(2 * a.rank), "--targets", targets, "--lr", "1e-4",
               "--steps", str(a.steps), "--out", os.path.join(tmp, "out"), "--log-json", log,
               "--base-dtype", a.base_dtype]
        if a.method == "vera":
            cmd[cmd.index("--rank") + 1] = str(max(a.rank, 256))
            del cmd[cmd.index("--alpha"):cmd.index("--alpha") + 2]  # VeRA has no alpha (refused)
        if a.method == "delta-lora":
            cmd += ["--delta-warmup", "0"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        steps = [json.loads(l) for l in open(log)]
    rates = [s["tokens"] / s["seconds"] for s in steps[a.warmup:]]
    return statistics.median(rates), [s["loss"] for s in steps]


def peft_speed(a, ids, targets, autocast=None):
    import torch
    import transformers
    import peft
    import peft.optimizers
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if a.model.endswith(".gguf"):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(a.model)), gguf_file=os.path.basename(a.model), dtype=torch.float32).to(dev)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(dev)
    tlist = targets.split(",")
    if a.method == "vera":
        cfg = peft.VeraConfig(r=max(a.rank, 256), target_modules=tlist)
    else:
        cfg = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=tlist,
                              fan_in_fan_out=model.config.model_type == "gpt2")
    model = peft.get_peft_model(model, cfg)
    if a.method == "lora-fa":
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if a.method == "lora-plus":
        opt = peft.optimizers.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = torch.tensor(ids, device=dev)
    model.train()
    rates, losses = [], []
    for step in range(a.steps):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad()
        if autocast:
            with torch.autocast(dev, dtype=autocast):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        old = None
        if a.method == "delta-lora":
            old = [(m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone(), m)
                   for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
        opt.step()
        if old:
            with torch.no_grad():
                for a0, b0, m in old:
                    s = m.scaling["default"]
                    d = 2.0 * s * (m.lora_B["default"].weight @ m.lora_A["default"].weight - b0 @ a0)
                    w = m.get_base_layer().weight
                    w += d.T if m.fan_in_fan_out else d
        losses.append(float(loss))
        if dev == "cuda":
            torch.cuda.synchronize()
        rates.append(ids.numel() / (time.perf_counter() - t0))
    name = torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return statistics.median(rates[a.warmup:]), losses, name


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--method", default="lora")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--targets")
    p.add_argument("--base-dtype", default="auto")
    p.add_argument("--torch", default="f32", help="PyTorch's precisions to time: f32, bf16 (autocast) or both")
    p.add_argument("--portalora", default=os.path.join(os.path.dirname(__file__), "..", "target/release/portalora"))
    a = p.parse_args()
    if a.model.endswith(".gguf"):
        # The few fields needed here, from the portalora CLI (which reads GGUF metadata).
        out = subprocess.run([a.portalora, "inspect", "--model", a.model], check=True, capture_output=True, text=True)
        info = dict(l.split(":", 1) for l in out.stdout.splitlines() if ":" in l)
        family = info.get("family", info.get("architecture", "")).strip().lower()
        cfg = {"model_type": family, "vocab_size": int(info["vocab"])}
    else:
        cfg = json.load(open(os.path.join(a.model, "config.json")))
    targets = a.targets or (GPT2 if cfg.get("model_type") == "gpt2" else LLAMA)
    import random
    rng = random.Random(0)
    ids = [[rng.randrange(cfg["vocab_size"]) for _ in range(a.seq)] for _ in range(a.batch)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"input_ids": ids}, f)
    ours, our_losses = portalora_speed(a, f.name, targets)
    theirs, their_losses, device = peft_speed(a, ids, targets)
    os.unlink(f.name)
    print(f"{'':12} {'tokens/s':>10}  first losses")
    print(f"{'portalora':12} {ours:>10.1f}  {[round(l, 4) for l in our_losses[:3]]}")
    print(f"{'PEFT':12} {theirs:>10.1f}  {[round(l, 4) for l in their_losses[:3]]}  on {device}")
    print(f"ratio portalora / PEFT: {ours / theirs:.3f}")
    out = {"method": a.method, "batch": a.batch, "seq": a.seq, "portalora_tokens_per_s": ours,
           "peft_tokens_per_s": theirs, "ratio": ours / theirs, "device": device}
    if "bf16" in a.torch.split(","):
        import torch
        bf16, bf16_losses, _ = peft_speed(a, ids, targets, autocast=torch.bfloat16)
        print(f"{'PEFT bf16':12} {bf16:>10.1f}  {[round(l, 4) for l in bf16_losses[:3]]}  (autocast)")
        print(f"ratio portalora / PEFT bf16: {ours / bf16:.3f}")
        out.update(peft_bf16_tokens_per_s=bf16, ratio_bf16=ours / bf16)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
