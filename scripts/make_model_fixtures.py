#!/usr/bin/env python3
"""Reference fixtures for the model parity tests (issue: foundation).

For each config in configs/tiny-llava-*.json: build a random LlavaForConditionalGeneration with
transformers (f32, eager attention), give it non-trivial weights, save it with save_pretrained,
rewrite its keys into the other LLaVA key layouts, and record inputs and reference outputs:
logits, the mean loss, the summed loss with its token count (num_items_in_batch) and the
gradients of the mean loss with respect to the projector.

    pip install -r scripts/requirements.txt
    python scripts/make_model_fixtures.py            # writes tests/fixtures/model/<name>/
    python scripts/make_model_fixtures.py --check-saved DIR --fixture tests/fixtures/model/<name>
        # loads a directory saved by vsft in transformers and compares logits with the fixture
"""
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["tiny-llava-mha", "tiny-llava-gqa"]


def legacy_key(k: str) -> str:
    """transformers 5 save names -> the Hub's legacy layout (vision_model. included)."""
    for a, b in [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                 ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")]:
        if k.startswith(a):
            k = b + k[len(a):]
    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
        k = "vision_tower.vision_model." + k[len("vision_tower."):]
    return k


def v452_key(k: str) -> str:
    """legacy -> transformers 4.52-4.57 layout."""
    k = legacy_key(k)
    for a, b in [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                 ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")]:
        if k.startswith(a):
            return b + k[len(a):]
    return k


def v5_key(k: str) -> str:
    """legacy -> transformers 5 flat layout (no vision_model.)."""
    return v452_key(k).replace("model.vision_tower.vision_model.", "model.vision_tower.")


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights large enough that a wrong op shows in the logits (init std 0.02 hides a lot)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.12 * torch.randn(p.shape, generator=gen))


def make_inputs(cfg: LlavaConfig, gen: torch.Generator):
    per_image = cfg.image_seq_length
    vocab = cfg.text_config.vocab_size
    img, pad = cfg.image_token_index, cfg.pad_token_id
    seq = per_image + 12
    rows = []
    # Row 0: text, image, text, fills the sequence. Row 1: image first, shorter, right-padded.
    t0 = torch.randint(1, 290, (12,), generator=gen).tolist()
    rows.append(t0[:3] + [img] * per_image + t0[3:])
    t1 = torch.randint(1, 290, (7,), generator=gen).tolist()
    rows.append([1] + [img] * per_image + t1 + [pad] * (seq - per_image - 8))
    input_ids = torch.tensor(rows)
    attention_mask = (input_ids != pad).long()
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[0, :2] = -100  # a masked prompt, as the assistant mode would produce
    s = cfg.vision_config.image_size
    pixel_values = torch.randn((2, 3, s, s), generator=gen)
    assert vocab > pad
    return input_ids, attention_mask, labels, pixel_values


def build(name: str, out_dir: str) -> None:
    with open(os.path.join(ROOT, "configs", f"{name}.json")) as f:
        cfg_dict = json.load(f)
    cfg = LlavaConfig(**cfg_dict)
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.config._attn_implementation = "eager"
    randomise(model, gen)

    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    hf_dir = os.path.join(out_dir, "hf")
    model.save_pretrained(hf_dir, safe_serialization=True)
    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    # The same weights in each layout found in the wild.
    for layout, fn in [("legacy", legacy_key), ("v452", v452_key), ("v5", v5_key)]:
        d = os.path.join(out_dir, layout)
        os.makedirs(d)
        shutil.copy(os.path.join(hf_dir, "config.json"), d)
        save_file({fn(k): v.contiguous() for k, v in weights.items()}, os.path.join(d, "model.safetensors"),
                  metadata={"format": "pt"})
    shutil.rmtree(hf_dir)
    # A sharded copy with an old-style index (total_size only), from the legacy layout.
    d = os.path.join(out_dir, "sharded")
    os.makedirs(d)
    shutil.copy(os.path.join(out_dir, "legacy", "config.json"), d)
    legacy = {legacy_key(k): v.contiguous() for k, v in weights.items()}
    names = sorted(legacy)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    total = 0
    for fname, keys in shards.items():
        save_file({k: legacy[k].to(torch.bfloat16) for k in keys}, os.path.join(d, fname), metadata={"format": "pt"})
        for k in keys:
            weight_map[k] = fname
            total += legacy[k].numel() * 2
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    input_ids, attention_mask, labels, pixel_values = make_inputs(cfg, gen)
    model.zero_grad()
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels)
    out.loss.backward()
    proj = model.model.multi_modal_projector
    n_items = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        out_sum = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                        labels=labels, num_items_in_batch=torch.tensor(n_items))
    tensors = {
        "input_ids": input_ids.to(torch.int64),
        "attention_mask": attention_mask.to(torch.int64),
        "labels": labels.to(torch.int64),
        "pixel_values": pixel_values.float(),
        "logits": out.logits.detach().float(),
        "loss": out.loss.detach().reshape(1).float(),
        "loss_sum": (out_sum.loss.detach() * n_items).reshape(1).float(),
        "label_tokens": torch.tensor([n_items], dtype=torch.int64),
        "grad.multi_modal_projector.linear_1.weight": proj.linear_1.weight.grad.float(),
        "grad.multi_modal_projector.linear_1.bias": proj.linear_1.bias.grad.float(),
        "grad.multi_modal_projector.linear_2.weight": proj.linear_2.weight.grad.float(),
        "grad.multi_modal_projector.linear_2.bias": proj.linear_2.bias.grad.float(),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "reference.safetensors"))
    # Loading the bf16 shards in transformers gives the reference for the sharded copy.
    sharded = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits_bf16 = sharded(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    save_file({"logits": logits_bf16.float().contiguous()}, os.path.join(out_dir, "reference_sharded_bf16.safetensors"))
    # Greedy generation from row 0 (text, image, text), as `generate` does it (KV cache).
    prompt = input_ids[:1]
    with torch.no_grad():
        gen_ids = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=pixel_values[:1],
                                 max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=cfg.pad_token_id)
    with open(os.path.join(out_dir, "generate.json"), "w") as f:
        json.dump({"prompt": prompt[0].tolist(), "eos_token_id": 2, "max_new_tokens": 12,
                   "new_tokens": gen_ids[0, prompt.shape[1]:].tolist()}, f)
    print(f"{name}: loss {out.loss.item():.6f}, {n_items} label tokens, logits {tuple(out.logits.shape)} -> {out_dir}")


def check_saved(saved_dir: str, fixture: str) -> None:
    ref = load_file(os.path.join(fixture, "reference.safetensors"))
    model = LlavaForConditionalGeneration.from_pretrained(saved_dir, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                       pixel_values=ref["pixel_values"]).logits
    diff = (logits - ref["logits"]).abs().max().item()
    print(json.dumps({"saved_dir": saved_dir, "logits_max_abs_diff": diff}))
    if diff > 1e-4:
        sys.exit(f"saved model differs from the reference by {diff}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-saved")
    ap.add_argument("--fixture")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    if args.check_saved:
        check_saved(args.check_saved, args.fixture)
    else:
        for name in CONFIGS:
            build(name, os.path.join(ROOT, "tests", "fixtures", "model", name))
