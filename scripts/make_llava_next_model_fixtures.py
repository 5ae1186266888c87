#!/usr/bin/env python3
"""Reference fixtures for the LLaVA-NeXT (llava_next) model, trainer and LoRA parity tests.

Builds the tiny model of configs/tiny-llava-next.json (CLIP 56-px tiles of 14-px patches, Mistral
decoder with GQA, the real 32064-token vocabulary) with transformers (f32, eager attention), gives
it non-trivial random weights and writes tests/fixtures/llava_next/model/:

  legacy/            the Hub layout and file set of llava-hf/llava-v1.6-mistral-7b-hf (2 shards +
                     index, generation_config, tokenizer, chat_template.json, preprocessor_config.json,
                     processor_config.json); the processor is reloaded from disk and used for every input
  v452/, v5/         the same weights in the transformers 4.52-4.57 layout and in what 5.24's
                     save_pretrained writes
  sliding_window8/   config.json only (text_config.sliding_window = 8); weights are legacy/'s
  inputs.safetensors, reference.safetensors, reference.json
                     a real processor batch (scikit-image photographs, TRL's collator) and the
                     logits / losses / image features / gradients of transformers
  generate.json + generate_chelsea.png
                     greedy `generate` on the legacy model for the blog's prompt
  lora_init/, lora_final/, lora_batches.safetensors
                     a 6-step stage-2 LoRA run (PEFT + torch AdamW + clip_grad_norm_)

Everything numeric comes from transformers / PEFT / torch (pinned in scripts/requirements.txt).

    python3 scripts/make_llava_next_model_fixtures.py                 # regenerate
    python3 scripts/make_llava_next_model_fixtures.py --check-adapter DIR
        # loads a PEFT adapter directory written by vsft (optionally with a projector /
        # image_newline safetensors file next to it) on legacy/ and prints the mean loss on
        # inputs.safetensors as JSON, next to this fixture's numbers
"""
import argparse
import copy
import glob
import io
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import peft
import safetensors
import skimage.data
import torch
import transformers
import trl
from PIL import Image
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (AddedToken, LlamaTokenizer, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextProcessor)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from transformers.trainer_pt_utils import get_parameter_names
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny-llava-next.json")
OUT = os.path.join(ROOT, "tests", "fixtures", "llava_next", "model")
LEGACY = os.path.join(OUT, "legacy")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA_R, LORA_ALPHA = 8, 16
LORA_LR, PROJ_LR, WD, MAX_GRAD_NORM, STEPS = 1e-3, 2e-4, 0.1, 1.0, 6
SLIDING = 8


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# key layouts

def legacy_key(k: str) -> str:
    """Any layout (runtime names, 4.52, 5.x save) -> the Hub's legacy layout (vision_model. included)."""
    for a, b in [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                 ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                 ("model.image_newline", "image_newline")]:
        if k.startswith(a):
            k = b + k[len(a):]
            break
    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
        k = "vision_tower.vision_model." + k[len("vision_tower."):]
    return k


def v452_key(k: str) -> str:
    """-> transformers 4.52-4.57 layout."""
    k = legacy_key(k)
    for a, b in [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                 ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                 ("image_newline", "model.image_newline")]:
        if k.startswith(a):
            return b + k[len(a):]
    return k


# ----------------------------------------------------------------------------------------
# processor, images, batches

def build_processor(out_dir, template):
    """LlavaNextProcessor: the real Mistral-7B v0.1 sentencepiece vocabulary (mistral-common) +
    <image>=32000, <pad>=32001, a PIL anyres image processor scaled to 56-px tiles, written in the
    Hub's file set and reloaded from disk."""
    import mistral_common
    spm = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    tmp = os.path.join(OUT, "_spm_tmp")
    os.makedirs(tmp, exist_ok=True)
    shutil.copy(spm, os.path.join(tmp, "tokenizer.model"))
    tok = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True)
    shutil.rmtree(tmp)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    cfg = json.load(open(CONFIG))
    tile = cfg["vision_config"]["image_size"]
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=cfg["image_grid_pinpoints"], image_mean=CLIP_MEAN, image_std=CLIP_STD,
        resample=3, do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
        do_pad=True)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=cfg["vision_config"]["patch_size"],
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=template)
    tmp = os.path.join(OUT, "_proc_tmp")
    proc.save_pretrained(tmp)
    written = sorted(os.listdir(tmp))
    # Hub file set: preprocessor_config.json (image processor), processor_config.json (processor
    # keys only), chat_template.json; 5.24 writes a nested processor_config.json + chat_template.jinja.
    pc = json.load(open(os.path.join(tmp, "processor_config.json")))
    ipc = dict(pc.pop("image_processor"))
    ipc["processor_class"] = "LlavaNextProcessor"
    pc["processor_class"] = "LlavaNextProcessor"
    pc.pop("chat_template", None)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(ipc, f, indent=2)
    with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
        json.dump(pc, f, indent=2)
    with open(os.path.join(out_dir, "chat_template.json"), "w") as f:
        json.dump({"chat_template": template}, f, indent=2)
    for n in written:
        if n.startswith("tokenizer") or n == "special_tokens_map.json":
            shutil.copy(os.path.join(tmp, n), out_dir)
    shutil.rmtree(tmp)
    # compact tokenizer.json (same content, the older shorter merges form)
    tj = os.path.join(out_dir, "tokenizer.json")
    j = json.load(open(tj, encoding="utf-8"))
    merges = j["model"].get("merges")
    if merges and isinstance(merges[0], list) and not any(" " in a or " " in b for a, b in merges):
        j["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    with open(tj, "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))
    proc = LlavaNextProcessor.from_pretrained(out_dir)
    assert type(proc.image_processor).__name__ == "LlavaNextImageProcessorPil", type(proc.image_processor)
    assert proc.chat_template == template
    assert proc.num_additional_image_tokens == 1 and proc.patch_size == 14
    assert proc.vision_feature_select_strategy == "default"
    assert proc.image_processor.image_grid_pinpoints == cfg["image_grid_pinpoints"]
    return proc, written


def photo(arr, w, h):
    """A scikit-image photograph, centre-cropped to the aspect ratio w:h and resized to w x h (RGB)."""
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    arr = arr[..., :3]
    H, W = arr.shape[:2]
    if W / H > w / h:
        cw = round(H * w / h)
        x0 = (W - cw) // 2
        arr = arr[:, x0:x0 + cw]
    else:
        ch = round(W * h / w)
        y0 = (H - ch) // 2
        arr = arr[y0:y0 + ch]
    return Image.fromarray(np.ascontiguousarray(arr)).resize((w, h), Image.LANCZOS)


def conv(user, assistant, n_images, extra=()):
    msgs = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": user}]},
            {"role": "assistant", "content": [{"type": "text", "text": assistant}]}]
    for u, a in extra:
        msgs += [{"role": "user", "content": [{"type": "text", "text": u}]},
                 {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    return msgs


def collate(proc, rows):
    """TRL 1.16's collator (the SFTTrainer path): right padding, labels = ids with pads -100."""
    coll = DataCollatorForVisionLanguageModeling(processor=proc, max_length=None)
    b = coll([{"messages": m, "images": imgs} for m, imgs in rows])
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    exp = ids.clone()
    exp[mask == 0] = -100
    assert torch.equal(labels, exp)
    assert (ids[mask == 0] == proc.tokenizer.pad_token_id).all()
    assert set(b.keys()) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "labels"}, b.keys()
    return {"input_ids": ids.to(torch.int64), "attention_mask": mask.to(torch.int64), "labels": labels.to(torch.int64),
            "pixel_values": b["pixel_values"].to(torch.float32), "image_sizes": b["image_sizes"].to(torch.int64)}


def main_rows():
    coffee_wide = photo(skimage.data.coffee(), 1000, 200)      # extreme aspect: best res (56,168), unpad
    cat = photo(skimage.data.chelsea(), 640, 480)
    rocket_tall = photo(skimage.data.rocket(), 64, 400)
    return [
        (conv("What is on the table?", "A cup of coffee on a saucer.", 1), [coffee_wide]),
        (conv("Compare the two pictures.", "A tabby cat, then a tall thin rocket.", 2,
              extra=[("Which one flies?", "The rocket.")]), [cat, rocket_tall]),
    ]


def resolved_7b():
    """What LlavaNextConfig makes of configs/llava-v1.6-mistral-7b.json (the Hub's partial config)."""
    c = LlavaNextConfig.from_pretrained(os.path.join(ROOT, "configs", "llava-v1.6-mistral-7b.json"))
    t, v = c.text_config, c.vision_config
    return {"hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim, "intermediate_size": t.intermediate_size, "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_parameters["rope_theta"], "sliding_window": t.sliding_window,
            "vocab_size": t.vocab_size, "tie_word_embeddings": c.tie_word_embeddings,
            "image_grid_pinpoints": c.image_grid_pinpoints, "vision_hidden_act": v.hidden_act,
            "vision_image_size": v.image_size, "image_token_id": c.image_token_id}


def lora_rows():
    return [
        [(conv("Who is this?", "An astronaut.", 1), [photo(skimage.data.astronaut(), 112, 112)]),
         (conv("Describe the sky.", "Countless distant galaxies.", 1), [photo(skimage.data.hubble_deep_field(), 300, 180)])],
        [(conv("What stands here?", "A rocket on its pad.", 1), [photo(skimage.data.rocket(), 200, 300)]),
         (conv("Two pictures: what are they?", "Coffee, then a man with a camera.", 2),
          [photo(skimage.data.coffee(), 90, 56), photo(skimage.data.camera(), 150, 150)])],
        [(conv("What animal?", "A cat.", 1, extra=[("Its name?", "Chelsea.")]), [photo(skimage.data.chelsea(), 56, 168)]),
         (conv("What is this?", "A stained tissue sample.", 1), [photo(skimage.data.immunohistochemistry(), 333, 77)])],
    ]


# ----------------------------------------------------------------------------------------
# model

def load_config(sliding_window="keep"):
    d = json.load(open(CONFIG))
    if sliding_window != "keep":
        d["text_config"]["sliding_window"] = sliding_window
    return LlavaNextConfig(**d)


def randomise(model, gen):
    """Weights large enough that a wrong op shows in the logits (init std 0.02 hides a lot)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("image_newline"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.12 * torch.randn(p.shape, generator=gen))


def load_model(path, config=None):
    kw = {"config": config} if config is not None else {}
    m, info = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                               output_loading_info=True, **kw)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, (path, bad)
    return m.eval()


def forward(model, inp, **kw):
    return model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], pixel_values=inp["pixel_values"],
                 image_sizes=inp["image_sizes"], **kw)


def mean_loss(model, inp):
    with torch.no_grad():
        return forward(model, inp, labels=inp["labels"]).loss.item()


def write_sharded(weights, d):
    """Two shards + an old-style index (total_size only), split by size like max_shard_size."""
    names = sorted(weights)
    total = sum(weights[k].numel() * weights[k].element_size() for k in names)
    first, acc = [], 0
    for k in names:
        if acc >= total / 2:
            break
        first.append(k)
        acc += weights[k].numel() * weights[k].element_size()
    shards = {"model-00001-of-00002.safetensors": first,
              "model-00002-of-00002.safetensors": [k for k in names if k not in first]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: weights[k].contiguous() for k in keys}, os.path.join(d, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return {f: len(k) for f, k in shards.items()}


def logits_positions(inp, img_id):
    """(row, position) pairs: the first and last token of each image span, the last 6 real tokens of
    each row, and the first pad position of a padded row (flagged in reference.json)."""
    pos, kinds = [], []
    ids, mask = inp["input_ids"], inp["attention_mask"]
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        idx = (ids[r] == img_id).nonzero().flatten().tolist()
        spans, start = [], None
        for i, p in enumerate(idx):
            if start is None:
                start = p
            if i + 1 == len(idx) or idx[i + 1] != p + 1:
                spans.append((start, p))
                start = None
        for a, b in spans:
            for p in (a, b):
                pos.append((r, p))
                kinds.append("image")
        for p in range(n - 6, n):
            pos.append((r, p))
            kinds.append("text")
        if n < ids.shape[1]:
            pos.append((r, n))
            kinds.append("pad")
    return torch.tensor(pos, dtype=torch.int64), kinds


def per_token(logits, labels):
    lse = torch.logsumexp(logits, -1)
    lab = labels[:, 1:]
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    lp = torch.where(lab == -100, torch.zeros_like(lp), lp)
    return lse, logits.argmax(-1), lp


# ----------------------------------------------------------------------------------------

def build():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(LEGACY)
    trl_template = open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "llava_next.jinja")).read()
    proc, proc_written = build_processor(LEGACY, trl_template)
    img_id, pad_id = proc.image_token_id, proc.tokenizer.pad_token_id

    # ---- model and the three layouts
    cfg = load_config()
    assert cfg.text_config.sliding_window is None and cfg.text_config.num_key_value_heads == 2
    assert cfg.text_config.rope_parameters["rope_theta"] == 1e6 and not cfg.tie_word_embeddings
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.config._attn_implementation = "eager"
    randomise(model, gen)
    runtime_names = [n for n, _ in model.named_parameters()]

    tmp = os.path.join(OUT, "_save_tmp")
    model.save_pretrained(tmp)
    save_files = sorted(os.listdir(tmp))
    saved = load_file(os.path.join(tmp, "model.safetensors"))
    with safetensors.safe_open(os.path.join(tmp, "model.safetensors"), "pt") as f:
        save_metadata = f.metadata()
    os.makedirs(os.path.join(OUT, "v5"))
    shutil.copy(os.path.join(tmp, "model.safetensors"), os.path.join(OUT, "v5"))
    shutil.copy(os.path.join(tmp, "config.json"), os.path.join(OUT, "v5"))
    os.makedirs(os.path.join(OUT, "v452"))
    shutil.copy(os.path.join(tmp, "config.json"), os.path.join(OUT, "v452"))
    save_file({v452_key(k): v.contiguous() for k, v in saved.items()}, os.path.join(OUT, "v452", "model.safetensors"),
              metadata={"format": "pt"})
    legacy = {legacy_key(k): v.contiguous() for k, v in saved.items()}
    assert len(legacy) == len(saved) == len(runtime_names)
    shard_counts = write_sharded(legacy, LEGACY)
    shutil.copy(CONFIG, os.path.join(LEGACY, "config.json"))  # the Hub-style config (rope_theta, sliding_window null)
    shutil.copy(os.path.join(tmp, "generation_config.json"), LEGACY)
    shutil.rmtree(tmp)
    sw_dir = os.path.join(OUT, "sliding_window8")
    os.makedirs(sw_dir)
    sw_cfg = json.load(open(CONFIG))
    sw_cfg["text_config"]["sliding_window"] = SLIDING
    with open(os.path.join(sw_dir, "config.json"), "w") as f:
        json.dump(sw_cfg, f, indent=2)
    no_sw = json.load(open(CONFIG))
    del no_sw["text_config"]["sliding_window"]
    absent_sliding_window = LlavaNextConfig(**no_sw).text_config.sliding_window

    # ---- inputs: real processor (reloaded from disk), real photos, TRL's collator
    inp = collate(proc, main_rows())
    for k, v in inp.items():
        log(k, tuple(v.shape), v.dtype)
    save_file({k: v.contiguous() for k, v in inp.items()}, os.path.join(OUT, "inputs.safetensors"))

    # ---- every layout loads with 0 missing/unexpected keys and the same logits
    ref_model = load_model(LEGACY)
    with torch.no_grad():
        ref_logits = forward(ref_model, inp).logits
        mem_logits = forward(model, inp).logits
    layout_diffs = {"in_memory": (mem_logits - ref_logits).abs().max().item()}
    for layout in ["v452", "v5"]:
        m = load_model(os.path.join(OUT, layout))
        with torch.no_grad():
            layout_diffs[layout] = (forward(m, inp).logits - ref_logits).abs().max().item()
        del m
    m = load_model(LEGACY)
    # the legacy layout round-trips: re-saving a Hub-loaded model
    tmp = os.path.join(OUT, "_resave_tmp")
    m.save_pretrained(tmp)
    resaved_keys = sorted(load_file(os.path.join(tmp, "model.safetensors")).keys())
    shutil.rmtree(tmp)
    del m
    assert all(v == 0.0 for v in layout_diffs.values()), layout_diffs
    log("layouts", layout_diffs)

    model = ref_model.train()  # no dropout anywhere; train() only for the record
    # ---- forward references
    n_items = int((inp["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        out = forward(model, inp, labels=inp["labels"])
        out_sum = forward(model, inp, labels=inp["labels"], num_items_in_batch=torch.tensor(n_items))
        img_out = model.model.get_image_features(inp["pixel_values"], inp["image_sizes"])
        feats = img_out.pooler_output
        image_features = torch.cat(list(feats), 0)
        feature_lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
        # vision tower hidden state [-2] without CLS for the real tiles, and its projection
        n_tiles = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                   for s in inp["image_sizes"]]
        tiles = torch.cat([p[:n] for p, n in zip(inp["pixel_values"], n_tiles)], 0)
        vt = model.model.vision_tower(tiles, output_hidden_states=True)
        vision_hidden = vt.hidden_states[-2][:, 1:]
        projected = model.model.multi_modal_projector(vision_hidden)
    logits = out.logits
    ce_sum = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               inp["labels"][:, 1:].reshape(-1), reduction="sum").item()
    loss_sum = out_sum.loss.item() * n_items
    assert abs(ce_sum - loss_sum) <= 1e-5 * abs(ce_sum), (ce_sum, loss_sum)
    assert abs(out.loss.item() - ce_sum / n_items) <= 1e-6 * out.loss.item()
    n_img_tokens = int((inp["input_ids"] == img_id).sum())
    assert n_img_tokens == image_features.shape[0]
    positions, kinds = logits_positions(inp, img_id)
    pick = lambda lg: lg[positions[:, 0], positions[:, 1]].contiguous()
    lse, argmax, token_logprob = per_token(logits, inp["labels"])

    # stage 1: projector + image_newline train
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.multi_modal_projector.") or n == "model.image_newline")
    model.zero_grad()
    forward(model, inp, labels=inp["labels"]).loss.backward()
    stage1_grads = {"grad." + legacy_key(n): p.grad.detach().clone() for n, p in model.named_parameters()
                    if p.requires_grad}
    # vision tower trainable too
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.multi_modal_projector.") or n == "model.image_newline"
                         or n.startswith("model.vision_tower."))
    model.zero_grad(set_to_none=True)
    forward(model, inp, labels=inp["labels"]).loss.backward()
    vt_grads, no_grad = {}, []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad
        if g is None:
            no_grad.append(legacy_key(n))
            g = torch.zeros_like(p)
        vt_grads["grad_vt." + legacy_key(n)] = g.detach().clone()
    stage1_vs_vt = max((stage1_grads[k] - vt_grads["grad_vt." + k[5:]]).abs().max().item() for k in stage1_grads)
    assert stage1_vs_vt == 0.0, stage1_vs_vt
    for p in model.parameters():
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)

    # sliding window 8: the same weights, config changed
    sw_model = load_model(LEGACY, config=LlavaNextConfig(**sw_cfg))
    assert sw_model.config.text_config.sliding_window == SLIDING
    with torch.no_grad():
        sw_out = forward(sw_model, inp, labels=inp["labels"])
    sw_logits = sw_out.logits
    first_changed = []
    for r in range(2):
        n = int(inp["attention_mask"][r].sum())
        d = (sw_logits[r, :n] - logits[r, :n]).abs().amax(-1)
        ch = (d > 0).nonzero().flatten()
        first_changed.append(int(ch[0]) if len(ch) else None)
    sw_lse, sw_argmax, sw_token_logprob = per_token(sw_logits, inp["labels"])
    text_rows = [i for i, k in enumerate(kinds) if k == "text"]
    del sw_model

    ref_t = {
        "logits_positions": positions, "logits": pick(logits), "logsumexp": lse.contiguous(), "argmax": argmax,
        "token_logprob": token_logprob.contiguous(),
        "loss": torch.tensor([out.loss.item()], dtype=torch.float32),
        "loss_sum": torch.tensor([loss_sum], dtype=torch.float32),
        "label_tokens": torch.tensor([n_items], dtype=torch.int64),
        "image_features": image_features.contiguous(), "image_feature_lens": feature_lens,
        "vision_hidden": vision_hidden.contiguous(), "projected": projected.contiguous(),
        "sliding_window8.logits_positions": positions[text_rows].contiguous(),
        "sliding_window8.logits": pick(sw_logits)[text_rows].contiguous(),
        "sliding_window8.logsumexp": sw_lse.contiguous(), "sliding_window8.argmax": sw_argmax,
        "sliding_window8.token_logprob": sw_token_logprob.contiguous(),
        "sliding_window8.loss": torch.tensor([sw_out.loss.item()], dtype=torch.float32),
        **stage1_grads, **vt_grads,
    }
    save_file({k: v.detach().contiguous() for k, v in ref_t.items()}, os.path.join(OUT, "reference.safetensors"))

    # ---- generate (blog prompt, one real photograph read back from its file)
    photo_name = "generate_chelsea.png"
    photo(skimage.data.chelsea(), 225, 150).save(os.path.join(OUT, photo_name), optimize=True)
    gmsgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]
    prompt = proc.apply_chat_template(gmsgs, add_generation_prompt=True)
    assert prompt == "[INST] <image>\nWhat is shown in this image? [/INST]", repr(prompt)
    gim = Image.open(os.path.join(OUT, photo_name))
    ginp = proc(images=gim, text=prompt, return_tensors="pt")
    gen_model = load_model(LEGACY)
    gcfg = gen_model.generation_config
    with torch.no_grad():
        gout = gen_model.generate(**ginp, max_new_tokens=12, do_sample=False, use_cache=True,
                                  eos_token_id=2, pad_token_id=pad_id)
    plen = ginp["input_ids"].shape[1]
    new_tokens = gout[0, plen:].tolist()
    # the same tokens by full re-forwards without cache (argmax of the last position)
    ids = ginp["input_ids"]
    with torch.no_grad():
        for _ in range(len(new_tokens)):
            lg = gen_model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=ginp["pixel_values"],
                           image_sizes=ginp["image_sizes"], use_cache=False).logits
            ids = torch.cat([ids, lg[:, -1].argmax(-1, keepdim=True)], 1)
    assert ids[0, plen:].tolist() == new_tokens, (ids[0, plen:].tolist(), new_tokens)
    with open(os.path.join(OUT, "generate.json"), "w") as f:
        json.dump({"image": photo_name, "image_size_wh": list(gim.size), "messages": gmsgs, "prompt_text": prompt,
                   "prompt_ids_note": "processor(images=image, text=prompt_text): BOS added by the tokenizer",
                   "prompt": ginp["input_ids"][0].tolist(), "image_sizes": ginp["image_sizes"][0].tolist(),
                   "pixel_values_shape": list(ginp["pixel_values"].shape),
                   "n_image_tokens": int((ginp["input_ids"] == img_id).sum()),
                   "do_sample": False, "max_new_tokens": 12, "use_cache": True, "eos_token_id": 2,
                   "pad_token_id": pad_id, "new_tokens": new_tokens,
                   "new_text": proc.tokenizer.decode(new_tokens)}, f, indent=1)
    del gen_model
    log("generate", new_tokens)

    lora = lora_run(proc, inp)

    reference = {
        "versions": {"transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__,
                     "torch": torch.__version__, "safetensors": safetensors.__version__, "numpy": np.__version__,
                     "PIL": Image.__version__, "skimage": skimage.__version__},
        "attn_implementation": "eager", "dtype": "float32",
        "config": "configs/tiny-llava-next.json (= legacy/config.json)",
        "resolved_text_config": {k: getattr(cfg.text_config, k) for k in
                                 ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                  "rms_norm_eps", "rope_parameters", "sliding_window", "bos_token_id",
                                  "eos_token_id", "pad_token_id", "tie_word_embeddings"]},
        "resolved_top_level": {"tie_word_embeddings": cfg.tie_word_embeddings, "image_token_id": cfg.image_token_id,
                               "pad_token_id": cfg.pad_token_id, "image_seq_length": cfg.image_seq_length,
                               "multimodal_projector_bias": cfg.multimodal_projector_bias,
                               "vision_hidden_act": cfg.vision_config.hidden_act},
        "absent_sliding_window_resolves_to": absent_sliding_window,
        "weights": {"randomise": "norm weights 1+0.2N, biases 0.1N, image_newline 0.5N, others 0.12N "
                                 "(torch.Generator seed 1234)",
                    "n_tensors": len(legacy), "legacy_shards": shard_counts,
                    "save_pretrained_files": save_files, "save_pretrained_metadata": save_metadata,
                    "v5_keys_example": sorted(saved)[:3], "resave_of_legacy_load_keys_example": resaved_keys[:3],
                    "resave_of_legacy_load_is_legacy": resaved_keys == sorted(legacy),
                    "v5_is_legacy_without_vision_model": sorted(saved) == sorted(
                        k.replace("vision_tower.vision_model.", "vision_tower.") for k in legacy),
                    "runtime_names_order": runtime_names,
                    "layout_logits_max_abs_diff": layout_diffs},
        "processor": {"files_written_by_save_pretrained": proc_written,
                      "legacy_dir_files": sorted(os.listdir(LEGACY)),
                      "image_token_id": img_id, "pad_token_id": pad_id, "bos_token_id": proc.tokenizer.bos_token_id,
                      "chat_template": "trl/chat_templates/llava_next.jinja (chat_template.json)"},
        "inputs": {"builder": "trl DataCollatorForVisionLanguageModeling(processor, max_length=None): "
                              "apply_chat_template, right padding, add_special_tokens=False (no BOS), "
                              "labels = input_ids with pads -100 (image tokens stay targets)",
                   "rows": [{"messages": m, "images_wh": [list(i.size) for i in ims]} for m, ims in main_rows()],
                   "row_lengths": inp["attention_mask"].sum(1).tolist(),
                   "image_sizes_hw": inp["image_sizes"].tolist(), "tiles_per_image": n_tiles,
                   "image_tokens_per_image": feature_lens.tolist(), "n_image_tokens": n_img_tokens},
        "reference": {
            "logits_positions": "[K,2] (row, position); logits [K, vocab] at those positions",
            "logits_position_kinds": kinds,
            "logsumexp/argmax": "[B,T] over the full vocabulary at every position (pads included)",
            "token_logprob": "[B,T-1]: log_softmax(logits[:, t])[labels[:, t+1]], 0 where the label is -100",
            "loss": out.loss.item(), "loss_sum": loss_sum, "label_tokens": n_items,
            "loss_note": "loss = model(labels=).loss (mean over labels[:,1:] != -100); loss_sum = "
                         "model(labels=, num_items_in_batch=n).loss * n",
            "image_features": "get_image_features(pixel_values, image_sizes).pooler_output concatenated in image "
                              "order (projector + pack_image_features with unpad and image_newline); "
                              "image_feature_lens per image",
            "vision_hidden": "vision_tower(real tiles).hidden_states[-2][:, 1:] (CLS dropped), tiles concatenated "
                             "over images; projected = multi_modal_projector(vision_hidden)",
            "grad": "grad.<legacy name>: d(mean loss) w.r.t. multi_modal_projector.* and image_newline "
                    "(stage 1: only those require grad)",
            "grad_vt": "grad_vt.<legacy name>: same loss, a second backward with the vision tower, projector "
                       "and image_newline trainable; zeros stored where torch gives no gradient",
            "vision_params_without_grad": no_grad,
            "stage1_vs_vt_projector_grad_max_abs_diff": stage1_vs_vt,
        },
        "sliding_window8": {"config": "sliding_window8/config.json (legacy config with text_config.sliding_window "
                                      "= 8); weights: legacy/",
                            "loss": sw_out.loss.item(),
                            "tensors": "sliding_window8.* in reference.safetensors: logits at the text positions "
                                       "only (sliding_window8.logits_positions), logsumexp/argmax/token_logprob at "
                                       "every position",
                            "first_changed_position_per_row": first_changed,
                            "mask": "causal and key > query - 8 (a query sees 8 keys including itself)"},
        "lora": lora,
        "resolved_7b": resolved_7b(),
    }
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    log(f"wrote {OUT}: {total / 1e6:.2f} MB; loss {out.loss.item():.6f} over {n_items} tokens")


# ----------------------------------------------------------------------------------------
# stage 2: LoRA

def decay_names(model):
    """transformers Trainer.get_decay_parameter_names (5.24): not in a LayerNorm, no bias/norm in the name."""
    return set(get_parameter_names(model, [torch.nn.LayerNorm],
                                   [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]))


def lora_model():
    base = load_model(LEGACY).train()
    cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                     modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    torch.manual_seed(7)  # PEFT's kaiming-uniform init of lora_A uses the global RNG
    pm = get_peft_model(base, cfg)
    # image_newline stays frozen: LLaVA-NeXT's own LoRA mode (mm_tunable_parts) unfreezes only the
    # LoRA weights and the projector, and PEFT could not save a bare parameter as a module anyway.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return pm


def save_adapter(pm, d):
    """PEFT save_pretrained, then a repo-relative base_model_name_or_path and no model card."""
    pm.save_pretrained(d)
    ac = os.path.join(d, "adapter_config.json")
    j = json.load(open(ac))
    j["base_model_name_or_path"] = os.path.relpath(LEGACY, ROOT)
    with open(ac, "w") as f:
        json.dump(j, f, indent=2, sort_keys=True)
    if os.path.exists(os.path.join(d, "README.md")):
        os.remove(os.path.join(d, "README.md"))


def newline_file(pm, path):
    save_file({"image_newline": pm.base_model.model.model.image_newline.detach().clone().contiguous()}, path,
              metadata={"format": "pt"})


def lora_run(proc, inp):
    data = [collate(proc, rows) for rows in lora_rows()]
    bt = {}
    for i, b in enumerate(data):
        for k, v in b.items():
            bt[f"batch{i}.{k}"] = v
    save_file({k: v.contiguous() for k, v in bt.items()}, os.path.join(OUT, "lora_batches.safetensors"))

    pm = lora_model()
    save_adapter(pm, os.path.join(OUT, "lora_init"))
    trainable = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    decay = decay_names(pm)
    groups = {"lora_decay": [], "proj_decay": [], "proj_no_decay": [], "newline_decay": [], "newline_no_decay": []}
    group_names = {k: [] for k in groups}
    for n, p in trainable:
        kind = "lora" if "lora_" in n else ("newline" if n.endswith("image_newline") else "proj")
        assert kind != "lora" or n in decay
        key = f"{kind}_{'decay' if n in decay else 'no_decay'}"
        groups[key].append(p)
        group_names[key].append(n)
    assert all("modules_to_save" in n for n in group_names["proj_decay"] + group_names["proj_no_decay"])
    spec = {"lora_decay": (LORA_LR, WD), "proj_decay": (PROJ_LR, WD), "proj_no_decay": (PROJ_LR, 0.0),
            "newline_decay": (PROJ_LR, WD), "newline_no_decay": (PROJ_LR, 0.0)}
    opt = torch.optim.AdamW([{"params": groups[k], "lr": spec[k][0], "weight_decay": spec[k][1]}
                             for k in groups if groups[k]], betas=(0.9, 0.999), eps=1e-8)
    params = [p for _, p in trainable]
    losses, norms, tokens = [], [], []
    for step in range(STEPS):
        b = data[step % len(data)]
        opt.zero_grad(set_to_none=True)
        out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                 image_sizes=b["image_sizes"], labels=b["labels"])
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        losses.append(out.loss.item())
        norms.append(norm.item())
        tokens.append(int((b["labels"][:, 1:] != -100).sum()))
        log(f"lora step {step}: loss {losses[-1]:.6f} grad norm {norms[-1]:.6f}")
    pm.eval()
    in_memory_loss = mean_loss(pm, inp)
    fin = os.path.join(OUT, "lora_final")
    save_adapter(pm, fin)
    final_vals = {}
    inner = pm.base_model.model.model
    for n, p in inner.multi_modal_projector.modules_to_save["default"].named_parameters():
        final_vals[f"final.multi_modal_projector.{n}"] = p.detach().clone()
    final_vals["final.image_newline"] = inner.image_newline.detach().clone()
    save_file({k: v.contiguous() for k, v in final_vals.items()}, os.path.join(OUT, "lora_final_values.safetensors"))
    init_keys = sorted(load_file(os.path.join(OUT, "lora_init", "adapter_model.safetensors")))
    # the final model through PeftModel.from_pretrained (image_newline restored on the base first)
    check = check_adapter(fin, quiet=True)
    assert abs(check["loss"] - in_memory_loss) <= 1e-6 * in_memory_loss, (check, in_memory_loss)
    base_loss = mean_loss(load_model(LEGACY), inp)
    init_loss = check_adapter(os.path.join(OUT, "lora_init"), quiet=True)["loss"]
    return {
        "peft": {"r": LORA_R, "lora_alpha": LORA_ALPHA, "scaling": LORA_ALPHA / LORA_R, "lora_dropout": 0.0,
                 "target_modules": LORA_TARGETS, "modules_to_save": ["multi_modal_projector"],
                 "task_type": "CAUSAL_LM", "use_rslora": False,
                 "init": "lora_A: PEFT's kaiming-uniform (torch.manual_seed(7) before get_peft_model); "
                         "lora_B: 0.05 * N(0,1) from torch.Generator seed 5 (non-zero start)"},
        "image_newline": "frozen, as in LLaVA-NeXT's own LoRA mode (mm_tunable_parts unfreezes only LoRA "
                         "and the projector); a bare nn.Parameter could not be a PEFT module to save anyway",
        "projector": "PEFT modules_to_save (a trainable copy; adapter keys "
                     "base_model.model.model.multi_modal_projector.linear_{1,2}.{weight,bias})",
        "adapter_keys": init_keys,
        "trainable_parameter_order": [n for n, _ in trainable],
        "optimizer": "torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8, foreach default), one param group per "
                     "(kind, decay); decay set = transformers Trainer.get_decay_parameter_names rule (decay unless "
                     "in a LayerNorm or 'bias'/'norm' in the name): LoRA A/B and projector weights "
                     "decay, projector biases do not",
        "param_groups": [{"name": k, "lr": spec[k][0], "weight_decay": spec[k][1], "params": group_names[k]}
                         for k in groups if groups[k]],
        "lr": {"lora": LORA_LR, "projector": PROJ_LR, "schedule": "constant"},
        "weight_decay": WD, "max_grad_norm": MAX_GRAD_NORM, "steps": STEPS,
        "step": "opt.zero_grad(set_to_none=True); loss = model(**batch, labels=labels).loss (mean over "
                "labels[:,1:] != -100); loss.backward(); norm = clip_grad_norm_(all trainable params in "
                "trainable_parameter_order, 1.0) (returns the pre-clip global L2 norm); opt.step()",
        "batches": "lora_batches.safetensors batch{0,1,2}.*, step s uses batch s % 3",
        "batch_rows": [[{"messages": m, "images_wh": [list(i.size) for i in ims]} for m, ims in rows]
                       for rows in lora_rows()],
        "label_tokens_per_step": tokens,
        "losses": losses, "grad_norms_preclip": norms,
        "final_values": "lora_final_values.safetensors: final.multi_modal_projector.*, final.image_newline",
        "base_loss_on_inputs": base_loss,
        "init_loss_on_inputs": init_loss,
        "final_loss_on_inputs": check["loss"],
        "final_loss_on_inputs_in_memory": in_memory_loss,
        "final_loss_note": "legacy base, PeftModel.from_pretrained("
                           "lora_final), eval, model(labels=).loss on inputs.safetensors",
    }


# ----------------------------------------------------------------------------------------
# --check-adapter

def check_adapter(adapter_dir, quiet=False):
    """PeftModel.from_pretrained(legacy base, adapter_dir) and the mean loss on inputs.safetensors.

    Extra *.safetensors files in adapter_dir (other than adapter_model.safetensors) are loaded onto
    the base first when their keys name image_newline or multi_modal_projector.* (any layout, PEFT
    prefixes allowed) - e.g. image_newline.safetensors or vsft's projector.safetensors."""
    base = load_model(LEGACY)
    loaded = []
    params = dict(base.named_parameters())
    legacy_to_runtime = {legacy_key(n): n for n in params}
    for f in sorted(glob.glob(os.path.join(adapter_dir, "*.safetensors"))):
        if os.path.basename(f) == "adapter_model.safetensors":
            continue
        for k, v in load_file(f).items():
            kk = k.replace("base_model.model.", "", 1) if k.startswith("base_model.model.") else k
            kk = kk.replace(".modules_to_save.default", "")
            name = legacy_to_runtime.get(legacy_key(kk))
            if name is None or not (name == "model.image_newline" or ".multi_modal_projector." in name):
                raise SystemExit(f"{f}: unexpected tensor {k}")
            with torch.no_grad():
                params[name].copy_(v.to(torch.float32))
            loaded.append(f"{os.path.basename(f)}:{k}")
    pm = PeftModel.from_pretrained(base, adapter_dir).eval()
    inp = load_file(os.path.join(OUT, "inputs.safetensors"))
    res = {"adapter_dir": adapter_dir, "loss": mean_loss(pm, inp), "extra_tensors_loaded": loaded}
    ref_path = os.path.join(OUT, "reference.json")
    if not quiet and os.path.exists(ref_path):
        lora = json.load(open(ref_path))["lora"]
        res["fixture_final_loss"] = lora["final_loss_on_inputs"]
        res["fixture_base_loss"] = lora["base_loss_on_inputs"]
        res["abs_diff_vs_fixture_final"] = abs(res["loss"] - lora["final_loss_on_inputs"])
    if not quiet:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-adapter", metavar="DIR")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    if args.check_adapter:
        check_adapter(args.check_adapter)
    else:
        build()
