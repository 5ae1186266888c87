#!/usr/bin/env python3
"""The PyTorch side of `vsft bench train`: the same training step with transformers + PEFT on
the same model directory (LoRA on the language model's linear layers, projector trained in full,
vision tower frozen, AdamW), synthetic batches of the same shape. Prints the same JSON.

    python scripts/bench_torch.py --model DIR --batch-size 4 --seq-len 512 --lora-r 16 --steps 5 [--threads 2]
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--stage", default="instruct")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", help="frozen weights' dtype (bfloat16 on GPU)")
    ap.add_argument("--label-all", action="store_true",
                    help="label every position (default: image positions -100, as collators mask them)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    cfg = AutoConfig.from_pretrained(a.model)
    # LLaVA-1.5, LLaVA-NeXT with one 4:3 photo per row (640×480 at 336-px tiles: the 2×2 grid
    # plus the base tile, 5 tiles), or Qwen2-VL with one 640×480 photo at native resolution
    # (476×644: 34×46 patches, 391 tokens), as `vsft bench train` lays out the same step.
    next_family = cfg.model_type == "llava_next"
    qwen = cfg.model_type in ("qwen2_vl", "qwen2_5_vl")
    cls = {"llava_next": LlavaNextForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration,
           "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}.get(cfg.model_type, LlavaForConditionalGeneration)
    model = cls.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(dev)
    cfg = model.config
    if a.stage == "instruct":
        lcfg = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
                          target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                          modules_to_save=["multi_modal_projector"])
        if qwen:
            lcfg.modules_to_save = ["visual.merger"]
        model = get_peft_model(model, lcfg)
    else:
        for n, p in model.named_parameters():
            p.requires_grad_("multi_modal_projector" in n or "visual.merger" in n)
    # Trainable parameters in f32 (LoRA and projector), frozen ones in `dtype`.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    s = getattr(cfg.vision_config, "image_size", 0)
    extra = {}
    if qwen:
        gh, gw = 34, 46  # smart_resize(480, 640) = 476 × 644
        per_image = gh * gw // 4
        pix = torch.randn((a.batch_size * gh * gw, 1176), generator=g).to(dev, dtype)
        extra["image_grid_thw"] = torch.tensor([[1, gh, gw]] * a.batch_size).to(dev)
    elif next_family:
        sizes = torch.tensor([[480 * s // 336, 640 * s // 336]] * a.batch_size)
        pix = torch.randn((a.batch_size, 5, 3, s, s), generator=g).to(dev, dtype)
        with torch.no_grad():
            per_image = model.get_image_features(pixel_values=pix[:1], image_sizes=sizes[:1]).pooler_output[0].shape[0]
        extra["image_sizes"] = sizes.to(dev)
    else:
        per_image = cfg.image_seq_length
        pix = torch.randn((a.batch_size, 3, s, s), generator=g).to(dev, dtype)
    ids = torch.randint(3, 32000, (a.batch_size, a.seq_len), generator=g)
    if qwen:
        ids[:, 0] = cfg.vision_start_token_id
        ids[:, 1:1 + per_image] = cfg.image_token_id
        ids[:, 1 + per_image] = cfg.vision_end_token_id
        extra["mm_token_type_ids"] = (ids == cfg.image_token_id).long().to(dev)
    else:
        ids[:, 0] = 1
        ids[:, 1:1 + per_image] = cfg.image_token_index
    ids = ids.to(dev)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if not a.label_all:
        labels[ids == (cfg.image_token_id if qwen else cfg.image_token_index)] = -100
    times = []
    for step in range(a.steps + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels, **extra)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss = out.loss.item()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:
            times.append((time.perf_counter() - t) * 1e3)
    med = statistics.median(times)
    res = {"step_ms_median": med, "tokens_per_s": a.batch_size * a.seq_len / (med / 1e3),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
           "backend": f"torch {torch.__version__} {a.device}", "threads": a.threads, "final_loss": loss,
           "labels": "all positions" if a.label_all else "image positions -100",
           "family": cfg.model_type, "image_tokens": per_image}
    if dev.type == "cuda":
        res["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res))


if __name__ == "__main__":
    main()
