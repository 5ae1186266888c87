#!/usr/bin/env python3
"""Writes the LLaVA-NeXT parity fixtures of vsft-data to tests/fixtures/llava_next/data/.

Every number the Rust tests (crates/vsft-data/tests/llava_next.rs) compare against comes
from the pinned stack of scripts/requirements.txt: transformers' LlavaNextProcessor with
the PIL image backend (`LlavaNextImageProcessorPil`, anyres tiling), the Mistral
sentencepiece tokenizer bundled with mistral-common (converted like
scripts/make_data_fixtures.py does, `<image>`=32000, `<pad>`=32001), TRL 1.16's
`llava_next.jinja` / `llava_next_training.jinja` templates and TRL's
`DataCollatorForVisionLanguageModeling` (what SFTTrainer uses; max_length None).

    python3 scripts/make_llava_next_data_fixtures.py   # regenerate
    cargo test --release -p vsft-data --test llava_next

Processor settings: those of llava-hf/llava-v1.6-mistral-7b-hf (shortest edge 336, crop
336, the default image_grid_pinpoints, BICUBIC, do_pad, CLIP mean/std, patch 14, strategy
"default", num_additional_image_tokens 1), saved in the Hub's file layout
(preprocessor_config.json + processor_config.json + chat_template.json + tokenizer files)
and reloaded from disk before any reference is computed. transformers 5.24's own
save_pretrained layout (image processor nested in processor_config.json) is kept as
processor_config.5_24.json so that the tests can load that layout too.

Pixel references: full pixel_values are 5x3x336x336 f32 per image, so the fixture keeps
per image the SHA-256 of the little-endian f32 bytes of its (unpadded) tiles, plus every
STRIDE-th value (pixel_samples.safetensors) for diagnosing a mismatch.
"""
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
from transformers import AddedToken, LlamaTokenizer, LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "llava_next", "data")
TRL_TEMPLATES = os.path.join(os.path.dirname(trl.__file__), "chat_templates")

# llava-hf/llava-v1.6-mistral-7b-hf preprocessor_config.json / processor_config.json
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
STRIDE = 257  # every STRIDE-th f32 of each image's tiles goes to pixel_samples.safetensors
N_RANDOM_SIZES = 300


def log(*a):
    print(*a, file=sys.stderr)


# ----------------------------------------------------------------------------------------
# images: real photographs, centre-cropped to the aspect ratio and resized (LANCZOS) to W x H


def fit(arr, w, h):
    """Centre crop `arr` to the aspect ratio w:h, then resize to w x h."""
    H, W = arr.shape[:2]
    if W * h > H * w:  # too wide
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
    """name -> encoded bytes. Baseline JPEGs (decoded bit-exactly by vsft-data) for the large
    photographs, PNG for the small ones."""
    ast = skimage.data.astronaut()
    che = skimage.data.chelsea()
    hub = skimage.data.hubble_deep_field()
    roc = skimage.data.rocket()
    ret = skimage.data.retina()
    mot = skimage.data.stereo_motorcycle()[0]
    cof = skimage.data.coffee()
    cam = skimage.data.camera()
    return {
        "astronaut_336x336.jpg": jpeg(fit(ast, 336, 336), 90),          # square: 336x672 canvas
        "chelsea_640x480.jpg": jpeg(fit(che, 640, 480), 85),            # 2x2 grid
        "hubble_1000x200.jpg": jpeg(fit(hub, 1000, 200), 85, subsampling=0),  # 1x3, unpad rows
        "rocket_64x400.png": png(fit(roc, 64, 400)),                    # tall: 3x1
        "retina_1100x808.jpg": jpeg(fit(ret, 1100, 808), 80),           # 2x2, downscale
        "coffee_30x50.png": png(fit(cof, 30, 50)),                      # small: upscale
        "motorcycle_333x517.jpg": jpeg(fit(mot, 333, 517), 88, subsampling=1),  # odd sizes, 4:2:2
        "camera_900x31.png": png(fit(cam, 900, 31)),                    # mode L, extreme aspect
        "hubble_5000x1.png": png(fit(hub, 5000, 1)),                    # one row: base-only tokens
        "rocket_1x600.png": png(fit(roc, 1, 600)),                      # one column
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
     ["hubble_1000x200.jpg", "rocket_64x400.png"]),
    ({"messages": [msg("system", T("You are a careful ophthalmology assistant.")),
                   msg("user", I(0), T("Describe this fundus photograph.")),
                   msg("assistant", T("A retina: the optic disc on the right, vessels branching out."))]},
     ["retina_1100x808.jpg"]),
    ({"messages": [msg("user", T("Tiny picture: ")), msg("assistant", T("I need an image for that."))]},
     []),
    ({"messages": [msg("user", T("What drink? "), I(0)),
                   msg("assistant", T("Café au lait ☕, seen from above."))]},
     ["coffee_30x50.png"]),
    ({"messages": [msg("user", I(0), T("Which vehicle?")),
                   msg("assistant", T("A motorcycle — 摩托车.")),
                   msg("user", T("And this strip?")),
                   msg("assistant", T("Sorry, only one image was given in this turn.")),
                   msg("user", T("Fine.")),
                   msg("assistant", T("Anything else?"))]},
     ["motorcycle_333x517.jpg"]),
    ({"messages": [msg("user", I(0), T("A very wide grayscale strip: what is it?")),
                   msg("assistant", T("A thin slice of a photograph of a cameraman."))]},
     ["camera_900x31.png"]),
]
# Batches given to TRL's collator (rows of data/train-00000-of-00001.parquet).
BATCHES = [[0], [1, 2], [3, 4, 5], [6, 7], [2, 5, 7]]


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
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS,
        resample=3, do_pad=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True, rescale_factor=1 / 255)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=template)
    save_tmp = os.path.join(OUT, "_save_tmp")
    proc.save_pretrained(save_tmp)
    os.makedirs(proc_dir)
    # transformers 5.24's own layout: image processor nested in processor_config.json
    pc = json.load(open(os.path.join(save_tmp, "processor_config.json")))
    assert "image_processor" in pc, sorted(pc)
    with open(os.path.join(OUT, "processor_config.5_24.json"), "w") as f:
        json.dump(pc, f, indent=2, sort_keys=True)
    # the Hub layout: preprocessor_config.json + flat processor_config.json + chat_template.json
    ipc = dict(pc["image_processor"])
    ipc["processor_class"] = "LlavaNextProcessor"
    assert "LlavaNext" in ipc.get("image_processor_type", ""), ipc
    with open(os.path.join(proc_dir, "preprocessor_config.json"), "w") as f:
        json.dump(ipc, f, indent=2, sort_keys=True)
    flat = {k: v for k, v in pc.items() if k != "image_processor"}
    flat["processor_class"] = "LlavaNextProcessor"
    with open(os.path.join(proc_dir, "processor_config.json"), "w") as f:
        json.dump(flat, f, indent=2, sort_keys=True)
    with open(os.path.join(proc_dir, "chat_template.json"), "w") as f:
        json.dump({"chat_template": template}, f, indent=2)
    for name in ["tokenizer_config.json", "special_tokens_map.json"]:
        if os.path.exists(os.path.join(save_tmp, name)):
            shutil.copy(os.path.join(save_tmp, name), os.path.join(proc_dir, name))
    # compact tokenizer.json (same content, a third of the size)
    j = json.load(open(os.path.join(save_tmp, "tokenizer.json"), encoding="utf-8"))
    merges = j["model"]["merges"]
    if merges and isinstance(merges[0], list) and not any(" " in a or " " in b for a, b in merges):
        j["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    with open(os.path.join(proc_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))
    shutil.rmtree(save_tmp)
    # reload from disk: every reference comes from exactly what the fixture holds
    proc = LlavaNextProcessor.from_pretrained(proc_dir)
    assert type(proc.image_processor).__name__ == "LlavaNextImageProcessorPil", type(proc.image_processor)
    assert proc.chat_template == template
    assert proc.patch_size == 14 and proc.num_additional_image_tokens == 1
    assert proc.vision_feature_select_strategy == "default"
    assert [list(p) for p in proc.image_processor.image_grid_pinpoints] == PINPOINTS
    assert proc.image_token_id == 32000 and proc.tokenizer.pad_token_id == 32001
    return proc


def build_small_processor(proc_dir, tok):
    """Image-side files only (preprocessor_config.json + processor_config.json)."""
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112], [168, 56], [56, 168], [168, 168]],
        resample=3, do_pad=True, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    save_tmp = os.path.join(OUT, "_save_small")
    proc.save_pretrained(save_tmp)
    pc = json.load(open(os.path.join(save_tmp, "processor_config.json")))
    shutil.rmtree(save_tmp)
    os.makedirs(proc_dir)
    ipc = dict(pc.pop("image_processor"))
    with open(os.path.join(proc_dir, "preprocessor_config.json"), "w") as f:
        json.dump(ipc, f, indent=2, sort_keys=True)
    with open(os.path.join(proc_dir, "processor_config.json"), "w") as f:
        json.dump(pc, f, indent=2, sort_keys=True)
    # reload (image processor from disk) so the references come from the files
    ip2 = LlavaNextImageProcessorPil.from_pretrained(proc_dir)
    assert type(ip2).__name__ == "LlavaNextImageProcessorPil"
    assert (ip2.size, ip2.crop_size, ip2.image_grid_pinpoints) == (ip.size, ip.crop_size, ip.image_grid_pinpoints)
    return LlavaNextProcessor(image_processor=ip2, tokenizer=tok, **{k: pc[k] for k in
                              ["patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"]})


# ----------------------------------------------------------------------------------------


def pil(imgs, names):
    return [Image.open(io.BytesIO(imgs[n])) for n in names]


def sha256_f32(a):
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def count_image_tokens(proc, image):
    out = proc(text=["<image>"], images=[[image]], return_tensors="np")
    ids = out["input_ids"][0]
    return int((ids == proc.image_token_id).sum()), out


def random_sizes(rng, n):
    """(H, W) pairs: log-uniform sides in [1, 2600] plus extreme and boundary cases."""
    fixed = [(1, 1), (1, 5000), (5000, 1), (2, 3), (336, 336), (672, 672), (336, 1008), (1008, 336),
             (480, 640), (200, 1000), (808, 1100), (14, 14), (335, 337), (337, 335), (671, 1344),
             (1000, 999), (999, 1000), (24, 4000), (4000, 24), (517, 333)]
    out = list(fixed)
    while len(out) < n:
        h, w = np.exp(rng.uniform(0, np.log(2600), 2)).astype(int) + 1
        out.append((int(h), int(w)))
    return out


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    template = open(os.path.join(TRL_TEMPLATES, "llava_next.jinja")).read()
    training = open(os.path.join(TRL_TEMPLATES, "llava_next_training.jinja")).read()
    with open(os.path.join(OUT, "llava_next.jinja"), "w") as f:
        f.write(template)
    with open(os.path.join(OUT, "llava_next_training.jinja"), "w") as f:
        f.write(training)
    proc = build_processor(os.path.join(OUT, "processor"), template)
    ip = proc.image_processor
    image_id = proc.image_token_id

    imgs = make_images()
    img_dir = os.path.join(OUT, "images")
    os.makedirs(img_dir)
    for n, b in imgs.items():
        with open(os.path.join(img_dir, n), "wb") as f:
            f.write(b)

    # per image: pixel_values (hash + strided sample), image_sizes, best resolution, tiles, tokens
    images = {}
    samples = {}
    tiles_by_name = {}
    for n in imgs:
        im = Image.open(io.BytesIO(imgs[n]))
        out = ip([im], return_tensors="np")
        pv = out["pixel_values"]
        assert pv.dtype == np.float32 and pv.ndim == 5 and pv.shape[0] == 1, (n, pv.shape, pv.dtype)
        tiles = np.ascontiguousarray(pv[0])
        tiles_by_name[n] = tiles
        h, w = (int(x) for x in out["image_sizes"][0])
        assert (h, w) == (im.height, im.width)
        best = select_best_resolution((h, w), ip.image_grid_pinpoints)
        tokens, full = count_image_tokens(proc, im)
        assert np.array_equal(full["pixel_values"], pv), n
        samples[n] = np.ascontiguousarray(tiles.reshape(-1)[::STRIDE])
        images[n] = {"image_sizes": [h, w], "mode": im.mode, "best_resolution": list(best),
                     "pixel_values_shape": list(pv.shape), "tiles": int(pv.shape[1]), "tokens": tokens,
                     "sha256": sha256_f32(tiles), "sample_stride": STRIDE}
        log(f"{n}: {w}x{h} best {best} tiles {pv.shape[1]} tokens {tokens}")
    save_file(samples, os.path.join(OUT, "pixel_samples.safetensors"))

    # the processor's token count (and tiles, best resolution) for many sizes, on blank images
    rng = np.random.default_rng(1234)
    sizes = []
    for h, w in random_sizes(rng, N_RANDOM_SIZES):
        im = Image.fromarray(np.zeros((h, w, 3), np.uint8))
        tokens, out = count_image_tokens(proc, im)
        mm = proc._get_num_multimodal_tokens(image_sizes=[[h, w]])["num_image_tokens"][0]
        assert mm == tokens, (h, w, mm, tokens)
        best = select_best_resolution((h, w), ip.image_grid_pinpoints)
        sizes.append({"hw": [h, w], "tokens": tokens, "tiles": int(out["pixel_values"].shape[1]), "best_resolution": list(best)})

    # dataset: one parquet shard in the hub layout
    ds_dir = os.path.join(OUT, "llava_instruct_mix", "data")
    os.makedirs(ds_dir)
    shard = "train-00000-of-00001.parquet"
    write_parquet(os.path.join(ds_dir, shard), ROWS, imgs)

    # per row: rendered text, generation-prompt ids (processor(text, images): BOS added)
    rows = []
    for i, (r, names) in enumerate(ROWS):
        e = {"row": i, "images": names, "messages": r["messages"],
             "text": proc.apply_chat_template([r["messages"]], tokenize=False)[0]}
        first_user = [m for m in r["messages"][:next(k for k, m in enumerate(r["messages"]) if m["role"] == "user") + 1]]
        gen = proc.apply_chat_template([first_user], tokenize=False, add_generation_prompt=True)[0]
        n_img = sum(c["type"] == "image" for m in first_user for c in m["content"])
        o = proc(text=[gen], images=[pil(imgs, names[:n_img])] if n_img else None, return_tensors="np")
        e["prompt_messages"] = len(first_user)
        e["prompt_text"] = gen
        e["prompt_ids"] = o["input_ids"][0].tolist()
        rows.append(e)

    # batches through TRL's collator: labels for the three vsft masks
    batches = []
    for b in BATCHES:
        ex = lambda: [{"messages": ROWS[i][0]["messages"], "images": pil(imgs, ROWS[i][1])} for i in b]
        coll = DataCollatorForVisionLanguageModeling(processor=proc, max_length=None)
        t = coll(ex())
        ids, am = t["input_ids"], t["attention_mask"]
        lab_pad = t["labels"]
        ref_pad = ids.clone()
        ref_pad[am == 0] = -100
        assert torch.equal(lab_pad, ref_pad)
        lab_pi = lab_pad.clone()
        lab_pi[ids == image_id] = -100
        coll_a = DataCollatorForVisionLanguageModeling(processor=proc, max_length=None, assistant_only_loss=True,
                                                       chat_template=training)
        ta = coll_a(ex())
        assert torch.equal(ta["input_ids"], ids), b
        lab_a = ta["labels"]
        assert not bool(((ids == image_id) & (lab_a != -100)).any())
        # pixel_values: the tile axis padded to the batch maximum with zeros; unpadded tiles
        # equal the per-image references
        names = [n for i in b for n in ROWS[i][1]]
        pv = t["pixel_values"].numpy() if "pixel_values" in t else None
        if names:
            assert pv.shape[0] == len(names)
            for k, n in enumerate(names):
                nt = tiles_by_name[n].shape[0]
                assert np.array_equal(pv[k, :nt], tiles_by_name[n]), (b, n)
                assert not pv[k, nt:].any()
            assert np.array_equal(t["image_sizes"].numpy(), np.array([images[n]["image_sizes"] for n in names]))
            assert torch.equal(ta["pixel_values"], t["pixel_values"])
        batches.append({
            "rows": b, "images": names,
            "pixel_values_shape": list(pv.shape) if pv is not None else None,
            "image_sizes": t["image_sizes"].tolist() if names else [],
            "input_ids": ids.tolist(), "attention_mask": am.tolist(),
            "labels": {"pad": lab_pad.tolist(), "pad+image": lab_pi.tolist(), "assistant": lab_a.tolist()},
        })

    # a tiny model's processor: 56-px tiles, pinpoints in multiples of 56, patch 14 (the
    # placeholder rule and the tiling at another tile size)
    small = build_small_processor(os.path.join(OUT, "processor_tile56"), proc.tokenizer)
    sip = small.image_processor
    tile56 = {"images": {}, "sizes": []}
    for n in imgs:
        im = Image.open(io.BytesIO(imgs[n]))
        out = sip([im], return_tensors="np")
        tokens, full = count_image_tokens(small, im)
        assert np.array_equal(full["pixel_values"], out["pixel_values"])
        tile56["images"][n] = {"pixel_values_shape": list(out["pixel_values"].shape), "tokens": tokens,
                               "best_resolution": list(select_best_resolution((im.height, im.width), sip.image_grid_pinpoints)),
                               "sha256": sha256_f32(out["pixel_values"][0])}
    for e in sizes:
        h, w = e["hw"]
        mm = small._get_num_multimodal_tokens(image_sizes=[[h, w]])["num_image_tokens"][0]
        best = select_best_resolution((h, w), sip.image_grid_pinpoints)
        tile56["sizes"].append({"hw": [h, w], "tokens": mm, "best_resolution": list(best)})
    # the count function equals the full processor on a subset of blank images
    for e in tile56["sizes"][::10]:
        h, w = e["hw"]
        tokens, out = count_image_tokens(small, Image.fromarray(np.zeros((h, w, 3), np.uint8)))
        assert tokens == e["tokens"], (h, w)
        e["tiles"] = int(out["pixel_values"].shape[1])

    meta = {
        "versions": {"transformers": transformers.__version__, "trl": trl.__version__, "torch": torch.__version__,
                     "tokenizers": __import__("tokenizers").__version__, "PIL": Image.__version__,
                     "numpy": np.__version__},
        "image_processor_class": type(ip).__name__,
        "pad_token_id": proc.tokenizer.pad_token_id, "image_token_id": image_id,
        "bos_token_id": proc.tokenizer.bos_token_id,
        "crop_size": ip.crop_size["height"], "patch_size": proc.patch_size,
        "num_additional_image_tokens": proc.num_additional_image_tokens,
        "image_grid_pinpoints": [list(p) for p in ip.image_grid_pinpoints],
        "train_file": shard, "n_rows": len(ROWS),
        "images": images, "sizes": sizes, "rows": rows, "batches": batches, "tile56": tile56,
    }
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    log(f"wrote {OUT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
