#!/usr/bin/env python3
"""Reference fixtures for the trainer and LoRA tests (issue: trainer).

Needs the model fixtures (scripts/make_model_fixtures.py) first.

1. Stage 1 with torch: the tiny-llava-mha model, projector only, torch.optim.AdamW (decay on
   weights, none on biases, as transformers' Trainer groups them), constant lr, no clipping,
   6 steps of batch 2; records each step's loss, and the same 6 steps run as gradient
   accumulation of 2 micro-batches of 1 row weighted by num_items_in_batch.
2. transformers' schedulers (linear, cosine, constant with warmup): the lr of every step.
3. PEFT: LoRA adapters (plain and rsLoRA) with random non-zero A/B on the language model plus the
   projector as modules_to_save, saved with save_pretrained, and the logits of the adapted model.

    python scripts/make_train_fixtures.py   # writes tests/fixtures/train/ and tests/fixtures/lora/
"""
import json
import os
import shutil

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration, get_scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests", "fixtures", "model", "tiny-llava-mha", "legacy")
LR, WD, STEPS = 1e-3, 0.1, 6


def load():
    m = LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager")
    return m.train()


def batches(cfg, gen):
    """Three batches of two rows (one image each), right-padded, cycled over the 6 steps."""
    img, pad, per = cfg.image_token_index, cfg.pad_token_id, cfg.image_seq_length
    out = []
    for _ in range(3):
        rows, lens = [], [int(torch.randint(6, 12, (1,), generator=gen)), int(torch.randint(3, 8, (1,), generator=gen))]
        seq = per + max(lens) + 1
        for n in lens:
            text = torch.randint(1, 290, (n,), generator=gen).tolist()
            row = [1] + [img] * per + text
            rows.append(row + [pad] * (seq - len(row)))
        ids = torch.tensor(rows)
        mask = (ids != pad).long()
        labels = ids.clone()
        labels[mask == 0] = -100
        s = cfg.vision_config.image_size
        out.append((ids, mask, labels, torch.randn((2, 3, s, s), generator=gen)))
    return out


def optimizer(model):
    proj = model.model.multi_modal_projector
    decay = [p for n, p in proj.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in proj.named_parameters() if n.endswith("bias")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=LR, betas=(0.9, 0.999), eps=1e-8)


def freeze(model):
    for n, p in model.named_parameters():
        p.requires_grad_("multi_modal_projector" in n)


def stage1(data, accumulate: bool):
    model = load()
    freeze(model)
    opt = optimizer(model)
    losses, norms = [], []
    for step in range(STEPS):
        ids, mask, labels, pix = data[step % len(data)]
        opt.zero_grad()
        if accumulate:
            n_items = int((labels[:, 1:] != -100).sum())
            total = 0.0
            for r in range(2):
                sl = slice(r, r + 1)
                width = int(mask[r].sum())  # each micro-batch unpadded, as a batch of one is collated
                out = model(input_ids=ids[sl, :width], attention_mask=mask[sl, :width], pixel_values=pix[sl],
                            labels=labels[sl, :width], num_items_in_batch=torch.tensor(n_items))
                out.loss.backward()
                total += out.loss.item()
            losses.append(total)
        else:
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels)
            out.loss.backward()
            losses.append(out.loss.item())
        norms.append(float(torch.nn.utils.get_total_norm(
            [p.grad for p in model.model.multi_modal_projector.parameters()])))
        opt.step()
    return losses, norms, model


def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(99)
    model = load()
    data = batches(model.config, gen)
    out_dir = os.path.join(ROOT, "tests", "fixtures", "train")
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for i, (ids, mask, labels, pix) in enumerate(data):
        tensors[f"batch{i}.input_ids"] = ids
        tensors[f"batch{i}.attention_mask"] = mask
        tensors[f"batch{i}.labels"] = labels
        tensors[f"batch{i}.pixel_values"] = pix
    losses, norms, trained = stage1(data, accumulate=False)
    acc_losses, _, _ = stage1(data, accumulate=True)
    proj = trained.model.multi_modal_projector
    for n, p in proj.named_parameters():
        tensors[f"final.multi_modal_projector.{n}"] = p.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "stage1_batches.safetensors"))
    schedules = {}
    for kind in ["constant_with_warmup", "linear", "cosine"]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_scheduler(kind, opt, num_warmup_steps=3, num_training_steps=10)
        lrs = []
        for _ in range(10):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        schedules[kind] = lrs
    ref = {"lr": LR, "weight_decay": WD, "steps": STEPS, "losses": losses, "grad_norms": norms,
           "accumulated_losses": acc_losses, "schedules_warmup3_total10": schedules}
    with open(os.path.join(out_dir, "stage1_reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print("stage 1 losses", losses)
    print("accumulated", acc_losses)

    # LoRA adapters written by PEFT, with non-zero B so that the adapter changes the logits.
    lora_root = os.path.join(ROOT, "tests", "fixtures", "lora")
    if os.path.exists(lora_root):
        shutil.rmtree(lora_root)
    ids, mask, labels, pix = data[0]
    for name, rslora in [("plain", False), ("rslora", True)]:
        base = load().eval()
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=rslora,
                         target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                         modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
        peft_model = get_peft_model(base, cfg)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n or "lora_A" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                elif "modules_to_save" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        d = os.path.join(lora_root, name)
        peft_model.save_pretrained(d)
        # One LoRA linear on its own: y = W x + scale * B(A(x)).
        q_proj = peft_model.base_model.model.model.language_model.layers[0].self_attn.q_proj
        x = torch.randn((3, q_proj.in_features), generator=g)
        with torch.no_grad():
            q_out = q_proj(x)
        with torch.no_grad():
            logits = peft_model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
            merged = peft_model.merge_and_unload()
            merged_logits = merged(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        save_file({"logits": logits.contiguous(), "merged_logits": merged_logits.contiguous(),
                   "input_ids": ids, "attention_mask": mask, "pixel_values": pix,
                   "q_proj.input": x, "q_proj.output": q_out.contiguous()},
                  os.path.join(d, "reference.safetensors"))
        print(name, "adapter keys:", len(load_file(os.path.join(d, "adapter_model.safetensors"))))


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    main()
