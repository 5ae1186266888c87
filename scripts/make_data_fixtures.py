#!/usr/bin/env python3
"""Writes the parity fixtures of vsft-data to tests/fixtures/data/.

Everything the Rust tests compare against comes from transformers / TRL (pinned in
scripts/requirements.txt): LlavaProcessor (LlamaTokenizer + CLIPImageProcessorPil),
processor.apply_chat_template(return_assistant_tokens_mask=True) and TRL's
DataCollatorForVisionLanguageModeling.

    python3 scripts/make_data_fixtures.py            # regenerate
    cargo test -p vsft-data                          # compare

Inputs: photographs bundled with scikit-image, the sentencepiece model bundled with
mistral-common (Mistral-7B v0.1's Llama-style 32000-token vocabulary).
"""
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
from transformers import AddedToken, LlamaTokenizer, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling
from trl.data_utils import prepare_multimodal_messages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "data")

CROP = 84  # small crop keeps the pixel fixtures small; 84/14 = 6 -> 36 image tokens
PATCH = 14

# hf-formats.md section 9 (llava-hf llava-1.5 chat_template.json)
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# blog-recipe.md (TRL vsft_llava.py LLAVA_CHAT_TEMPLATE, with the add_generation_prompt lines)
BLOG_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. {% for message in messages %}{% if message['role'] == 'user' %}"
    "USER: {% else %}ASSISTANT: {% endif %}{% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "{{ item['text'] }}{% elif item['type'] == 'image' %}<image>{% endif %}{% endfor %}{% if message['role'] == 'user' %} "
    "{% else %}{{eos_token}}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)

# A template exercising python string methods, raise_exception, loop controls and whitespace control.
EXTRA_TEMPLATE = """{{ bos_token }}{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}
    {% if message['role'] == 'system' %}[SYS] {{ (message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')).strip() }}
    {% else %}
{{ message['role'].capitalize() }}:{% for c in message['content'] %}{% if c['type'] == 'image' %} <image>{% continue %}{% endif %} {{ c['text'].strip() | replace('  ', ' ') }}{% endfor %}
{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}Assistant:{% endif %}"""


# Render-only: tojson (transformers' override: no HTML escaping, ensure_ascii=False), namespace,
# loop variables, filters.
JSON_TEMPLATE = """{%- set ns = namespace(n=0, chars=0) -%}
{%- for m in messages -%}
{%- set ns.n = ns.n + 1 -%}
{{ m['role'] | upper }}[{{ loop.index0 }}/{{ loop.length }}]: {{ m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('|') }}
{% if loop.first %}{{ m | tojson }}
{{ m['content'][-1] | tojson(indent=2) }}
{{ {'b': 1, 'a': [true, none, 'x<y & "z"']} | tojson(sort_keys=true) }}
{% endif %}
{%- if m['content'] | selectattr('type', 'equalto', 'image') | list | length > 1 %}{{ 'many images'.title() }}{% endif %}
{%- if loop.last %}total={{ ns.n }}{{ eos_token }}{% endif %}
{% endfor %}"""


def log(*a):
    print(*a, file=sys.stderr)


# ----------------------------------------------------------------------------------------
# images

def save_jpeg(arr, q=70, **kw):
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", quality=q, **kw)
    return b.getvalue()


def save_png(img):
    b = io.BytesIO()
    img.save(b, "PNG", optimize=True)
    return b.getvalue()


def make_images():
    ast = skimage.data.astronaut()
    cof = skimage.data.coffee()
    che = skimage.data.chelsea()
    roc = skimage.data.rocket()
    cam = skimage.data.camera()
    imgs = {}
    imgs["astronaut.jpg"] = save_jpeg(ast, 45)                       # 512x512 square
    imgs["coffee.jpg"] = save_jpeg(np.asarray(Image.fromarray(cof).resize((300, 200), Image.LANCZOS)), progressive=True)  # 300x200 landscape, progressive
    imgs["chelsea.jpg"] = save_jpeg(che, 55)                         # 451x300
    imgs["rocket_tall.jpg"] = save_jpeg(np.ascontiguousarray(roc[20:420, 250:400]), 70)  # 150x400 tall
    imgs["camera_gray.png"] = save_png(Image.fromarray(cam).resize((128, 96), Image.LANCZOS))  # mode L, 128x96
    # RGBA with an alpha gradient (composited onto white by the processor)
    a = np.ascontiguousarray(ast[40:160, 180:270])
    alpha = np.tile(np.linspace(0, 255, a.shape[1]).astype(np.uint8), (a.shape[0], 1))
    alpha[:10, :] = 0
    imgs["alpha.png"] = save_png(Image.fromarray(np.dstack([a, alpha]), "RGBA"))  # 90x120
    # tiny GIF: palette image with a transparent index, first frame of two
    g = Image.fromarray(np.asarray(Image.fromarray(che).resize((40, 30), Image.LANCZOS))).quantize(colors=32)
    g.info["transparency"] = 0
    g2 = g.rotate(90)
    b = io.BytesIO()
    g.save(b, "GIF", save_all=True, append_images=[g2], transparency=0)
    imgs["tiny.gif"] = b.getvalue()
    # tiny lossy WebP
    b = io.BytesIO()
    Image.fromarray(np.asarray(Image.fromarray(cof).resize((70, 50), Image.LANCZOS))).save(b, "WEBP", quality=80)
    imgs["tiny.webp"] = b.getvalue()
    # exactly the crop size: needs no resize and no crop
    imgs["exact.png"] = save_png(Image.fromarray(np.ascontiguousarray(che[100:100 + CROP, 150:150 + CROP])))
    # shortest edge already CROP: crop only
    imgs["croponly.png"] = save_png(Image.fromarray(np.ascontiguousarray(ast[200:200 + CROP, 150:280])))
    # smaller than the crop: upsampling
    imgs["small.png"] = save_png(Image.fromarray(np.asarray(Image.fromarray(roc).resize((60, 40), Image.LANCZOS))))
    return imgs


NO_RESIZE = ["exact.png", "croponly.png"]


def png16(a):
    import struct
    import zlib
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_decoder_fixtures():
    """JPEG variants (decoded by PIL/libjpeg-turbo) and a PIL BICUBIC resize sweep."""
    src = skimage.data.chelsea()[100:143, 150:211]  # 61x43: odd sizes exercise the MCU edges
    im = Image.fromarray(src)
    jpegs = {}
    for name, kw in [("s444", dict(subsampling=0)), ("s422", dict(subsampling=1)), ("s420", dict(subsampling=2)),
                     ("optimized", dict(optimize=True, quality=95)), ("restart", dict(restart_marker_blocks=3)),
                     ("restart_rows", dict(restart_marker_rows=1, subsampling=0)),
                     ("progressive", dict(progressive=True)),
                     ("progressive_444_restart", dict(progressive=True, subsampling=0, restart_marker_blocks=2)),
                     ("progressive_422", dict(progressive=True, subsampling=1, optimize=True))]:
        b = io.BytesIO()
        im.save(b, "JPEG", quality=kw.pop("quality", 80), **kw)
        jpegs[name + ".jpg"] = b.getvalue()
    b = io.BytesIO()
    im.convert("L").save(b, "JPEG", quality=85)
    jpegs["gray.jpg"] = b.getvalue()
    b = io.BytesIO()
    im.convert("L").save(b, "JPEG", quality=85, progressive=True)
    jpegs["gray_progressive.jpg"] = b.getvalue()
    b = io.BytesIO()
    im.transpose(Image.Transpose.TRANSPOSE).save(b, "JPEG", quality=85, subsampling=1)  # 4:2:2 of a tall image
    jpegs["s422_tall.jpg"] = b.getvalue()
    # 16-bit RGB / RGBA PNGs (written by hand: PIL cannot write them)
    rng = np.random.default_rng(0)
    for c in (3, 4):
        a = (rng.integers(0, 65536, (9, 11, c))).astype(np.uint16)
        if c == 4:
            a[..., 3] = np.linspace(0, 65535, 11).astype(np.uint16)[None, :]
        jpegs[f"rgb{'a' if c == 4 else ''}16.png"] = png16(a)
    decoded = {n: np.ascontiguousarray(np.asarray(transformers.image_transforms.convert_to_rgb(Image.open(io.BytesIO(d)))))
               for n, d in jpegs.items()}
    rs = np.ascontiguousarray(skimage.data.astronaut()[100:137, 150:199])  # 49x37
    rim = Image.fromarray(rs)
    sizes = [(30, 20), (70, 50), (49, 15), (20, 37), (7, 45), (75, 20), (37, 49), (48, 36), (50, 38), (5, 3), (25, 65)]
    resized = {f"{w}x{h}": np.ascontiguousarray(np.asarray(rim.resize((w, h), Image.BICUBIC))) for w, h in sizes}
    return jpegs, decoded, rs, resized


# ----------------------------------------------------------------------------------------
# conversations (canonical rows; messages in the llava-instruct-mix-vsft layout)

def T(text):
    return {"index": None, "text": text, "type": "text"}


def I(i):
    return {"index": i, "text": None, "type": "image"}


def msg(role, *content):
    return {"role": role, "content": list(content)}


TRAIN_ROWS = [
    # shard 0
    ({"messages": [msg("user", I(0), T("What is shown in this image?\n")),
                   msg("assistant", T("An astronaut in a white suit, with the American flag behind her."))]},
     ["astronaut.jpg"]),
    ({"messages": [msg("user", I(0), T("Describe the drink.")),
                   msg("assistant", T("A cup of café au lait ☕ on a saucer.")),
                   msg("user", T("Where is it, in Chinese?")),
                   msg("assistant", T("在桌子上。 It is on a table 🙂"))]},
     ["coffee.jpg"]),
    ({"messages": [msg("system", T("You are a helpful assistant.")),
                   msg("user", I(0), T("What animal is this?")),
                   msg("assistant", T("A tabby cat named Chelsea."))]},
     ["chelsea.jpg"]),
    ({"messages": [msg("user", T("Is this a rocket? Answer briefly.  "), I(0)),
                   msg("assistant", T("Yes: a rocket on its launch pad."))]},
     ["rocket_tall.jpg"]),
    ({"messages": [msg("user", I(0), T("Black and white?")),
                   msg("assistant", T("Yes, a grayscale photograph of a cameraman.")),
                   msg("user", T("Thanks!")),
                   msg("assistant", T("You're welcome."))]},
     ["camera_gray.png"]),
    # shard 1
    ({"messages": [msg("user", I(0), T("What do you see through the transparency?")),
                   msg("assistant", T("Part of a face, fading into white."))]},
     ["alpha.png"]),
    ({"messages": [msg("user", I(0), I(1), T("Compare these two small images.")),
                   msg("assistant", T("The first is a GIF of a cat; the second a WebP of coffee. Ünïcödé ok."))]},
     ["tiny.gif", "tiny.webp"]),
    ({"messages": [msg("user", I(0), T("Crop?")),
                   msg("assistant", T("No crop was needed."))]},
     ["exact.png"]),
    ({"messages": [msg("user", I(0), T("And this one?")),
                   msg("assistant", T("Only a centre crop."))]},
     ["croponly.png"]),
    ({"messages": [msg("user", I(0), T("Tiny rocket.")),
                   msg("assistant", T("Upsampled from 60×40."))]},
     ["small.png"]),
]
TEST_ROWS = [
    ({"messages": [msg("user", I(0), T("Again the cat.")),
                   msg("assistant", T("Still Chelsea."))]},
     ["tiny.gif"]),
    ({"messages": [msg("user", I(0), T("Last one: who is this?")),
                   msg("assistant", T("Nobody: a crop of a cat."))]},
     ["exact.png"]),
]
TRAIN_SHARDS = [(0, 5), (5, 10)]


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
    # two rows per row group so that the reader crosses row groups
    pq.write_table(table, path, row_group_size=2)


def to_llava_json(rows, ids):
    """Original LLaVA format for single-image rows whose image leads the first user turn."""
    out = []
    for (r, names), rid in zip(rows, ids):
        msgs = r["messages"]
        if len(names) != 1 or msgs[0]["role"] != "user" or msgs[0]["content"][0]["type"] != "image":
            continue
        if any(m["role"] == "system" for m in msgs):
            continue
        conv = []
        for k, m in enumerate(msgs):
            texts = [c["text"] for c in m["content"] if c["type"] == "text"]
            assert len(texts) == 1
            v = ("<image>\n" if k == 0 else "") + texts[0]
            conv.append({"from": "human" if m["role"] == "user" else "gpt", "value": v})
        out.append({"id": rid, "image": names[0], "conversations": conv})
    return out


# ----------------------------------------------------------------------------------------

def build_processor(model_dir):
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
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3, do_convert_rgb=True, do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_HF_TEMPLATE)
    proc.save_pretrained(model_dir)
    # Legacy layout too: preprocessor_config.json (read first by vsft-data and by transformers)
    pc = json.load(open(os.path.join(model_dir, "processor_config.json")))
    ipc = dict(pc["image_processor"])
    ipc["processor_class"] = "LlavaProcessor"
    json.dump(ipc, open(os.path.join(model_dir, "preprocessor_config.json"), "w"), indent=2)
    # compact tokenizer.json (same content, a third of the size)
    tj = os.path.join(model_dir, "tokenizer.json")
    j = json.load(open(tj, encoding="utf-8"))
    merges = j["model"]["merges"]
    if merges and isinstance(merges[0], list) and not any(" " in a or " " in b for a, b in merges):
        j["model"]["merges"] = [f"{a} {b}" for a, b in merges]  # the older, shorter merges form
    with open(tj, "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))
    # reload from disk so the references come from exactly what the fixture holds
    proc = LlavaProcessor.from_pretrained(model_dir)
    assert type(proc.image_processor).__name__.endswith("Pil"), type(proc.image_processor)
    return proc


def pil_images(imgs, names):
    return [Image.open(io.BytesIO(imgs[n])) for n in names]


def as_list(t):
    return t.tolist() if hasattr(t, "tolist") else t


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    model_dir = os.path.join(OUT, "model")
    proc = build_processor(model_dir)
    tok = proc.tokenizer
    pad_id = tok.pad_token_id
    image_id = proc.image_token_id
    with open(os.path.join(OUT, "llava_hf.jinja"), "w") as f:
        f.write(LLAVA_HF_TEMPLATE)
    with open(os.path.join(OUT, "blog.jinja"), "w") as f:
        f.write(BLOG_TEMPLATE)
    with open(os.path.join(OUT, "extra.jinja"), "w") as f:
        f.write(EXTRA_TEMPLATE)
    with open(os.path.join(OUT, "json.jinja"), "w") as f:
        f.write(JSON_TEMPLATE)

    imgs = make_images()
    img_dir = os.path.join(OUT, "images")
    os.makedirs(img_dir)
    for n, b in imgs.items():
        with open(os.path.join(img_dir, n), "wb") as f:
            f.write(b)

    # datasets: hub layout data/{train,test}-*.parquet
    ds_dir = os.path.join(OUT, "llava_instruct_mix", "data")
    os.makedirs(ds_dir)
    shard_files = []
    for k, (a, b) in enumerate(TRAIN_SHARDS):
        name = f"train-{k:05d}-of-{len(TRAIN_SHARDS):05d}.parquet"
        write_parquet(os.path.join(ds_dir, name), TRAIN_ROWS[a:b], imgs)
        shard_files += [(name, i) for i in range(b - a)]
    write_parquet(os.path.join(ds_dir, "test-00000-of-00001.parquet"), TEST_ROWS, imgs)
    llava = to_llava_json(TRAIN_ROWS, [f"train-{i}" for i in range(len(TRAIN_ROWS))])
    with open(os.path.join(OUT, "llava.json"), "w", encoding="utf-8") as f:
        json.dump(llava, f, ensure_ascii=False, indent=1)

    # pixel values per image (PIL backend)
    pix = {}
    stats = {}
    for n in imgs:
        pv = proc.image_processor([Image.open(io.BytesIO(imgs[n]))], return_tensors="np")["pixel_values"][0]
        pix[n] = np.ascontiguousarray(pv.astype(np.float32))
        stats[n] = {"mean": float(pv.astype(np.float64).mean()), "abs_mean": float(np.abs(pv.astype(np.float64)).mean()),
                    "shape": list(pv.shape), "no_resize": n in NO_RESIZE}
    save_file(pix, os.path.join(OUT, "pixel_values.safetensors"))

    jpegs, decoded, rsrc, resized = make_decoder_fixtures()
    jdir = os.path.join(OUT, "jpeg")
    os.makedirs(jdir)
    for n, b in jpegs.items():
        with open(os.path.join(jdir, n), "wb") as f:
            f.write(b)
    save_file({**{"decoded/" + k: v for k, v in decoded.items()}, "resize/src": rsrc,
               **{"resize/" + k: v for k, v in resized.items()}}, os.path.join(OUT, "pil_uint8.safetensors"))

    templates = {"llava_hf": LLAVA_HF_TEMPLATE, "blog": BLOG_TEMPLATE, "extra": EXTRA_TEMPLATE, "json": JSON_TEMPLATE}

    # rendered text per row and template
    rendered = []
    for i, (r, names) in enumerate(TRAIN_ROWS):
        e = {"row": i, "images": names, "messages": r["messages"]}
        for tn, tt in templates.items():
            e[tn] = proc.apply_chat_template([r["messages"]], chat_template=tt, tokenize=False)[0]
            e[tn + "_gen"] = proc.apply_chat_template([r["messages"]], chat_template=tt, tokenize=False,
                                                      add_generation_prompt=True)[0]
        # generation-prompt ids, as processor(text, images) tokenizes them (BOS added)
        e["llava_hf_gen_ids"] = proc(text=[e["llava_hf_gen"]], images=[pil_images(imgs, names)],
                                     return_tensors="pt")["input_ids"][0].tolist()
        rendered.append(e)

    batches = [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]
    refs = []
    for rows in batches:
        examples = [TRAIN_ROWS[i] for i in rows]
        for tn in ["llava_hf", "blog", "extra"]:
            tt = templates[tn]
            for ast in [True, False]:
                for mult in [None, 8]:
                    if mult is not None and (tn != "llava_hf" or ast):
                        continue
                    msgs = [e["messages"] for e, _ in examples]
                    texts = [proc.apply_chat_template([m], chat_template=tt, tokenize=False)[0] for m in msgs]
                    images = [pil_images(imgs, names) for _, names in examples]
                    # processor.apply_chat_template(tokenize=True) semantics: no special tokens are
                    # added when the rendered text already starts with BOS (no double BOS).
                    ast_eff = ast and not texts[0].startswith(tok.bos_token)
                    out = proc(text=texts, images=images, padding=True, padding_side="right",
                               add_special_tokens=ast_eff, pad_to_multiple_of=mult, return_tensors="pt")
                    if ast_eff != ast:
                        conv = [prepare_multimodal_messages(m, images=im) for m, im in zip(msgs, images)]
                        o3 = proc.apply_chat_template(
                            conv, chat_template=tt, tokenize=True, return_dict=True, return_tensors="pt",
                            processor_kwargs={"padding": True, "padding_side": "right", "add_special_tokens": ast})
                        assert torch.equal(o3["input_ids"], out["input_ids"])
                    ids = out["input_ids"]
                    am = out["attention_mask"]
                    lab_pad = ids.clone()
                    lab_pad[am == 0] = -100
                    # blog collator: labels[labels == pad] = -100 -- identical when <pad> is never in the text
                    lab_blog = ids.clone()
                    lab_blog[lab_blog == pad_id] = -100
                    assert torch.equal(lab_pad, lab_blog)
                    lab_pi = lab_pad.clone()
                    lab_pi[ids == image_id] = -100
                    ref = {"rows": [[shard_files[i][0], shard_files[i][1], i] for i in rows], "template": tn,
                           "add_special_tokens": ast, "pad_to_multiple_of": mult,
                           "input_ids": as_list(ids), "attention_mask": as_list(am),
                           "labels": {"pad": as_list(lab_pad), "pad+image": as_list(lab_pi)}}
                    if tn == "llava_hf":
                        conv = [prepare_multimodal_messages(m, images=im) for m, im in zip(msgs, images)]
                        o2 = proc.apply_chat_template(
                            conv, chat_template=tt, tokenize=True, return_dict=True, return_tensors="pt",
                            return_assistant_tokens_mask=True,
                            processor_kwargs={"padding": True, "padding_side": "right", "pad_to_multiple_of": mult,
                                              "add_special_tokens": ast})
                        assert torch.equal(o2["input_ids"], ids), (rows, tn, ast)
                        lab_a = ids.clone()
                        lab_a[am == 0] = -100
                        lab_a[torch.as_tensor(o2["assistant_masks"]) == 0] = -100
                        ref["labels"]["assistant"] = as_list(lab_a)
                        if not ast:
                            # TRL 1.16's collator: the authoritative reference for add_special_tokens=False
                            for aol, key in [(False, "pad"), (True, "assistant")]:
                                coll = DataCollatorForVisionLanguageModeling(
                                    processor=proc, pad_to_multiple_of=mult, assistant_only_loss=aol, chat_template=tt)
                                ex = [{"messages": e["messages"], "images": pil_images(imgs, names)} for e, names in examples]
                                t = coll(ex)
                                assert torch.equal(t["input_ids"], ids), (rows, key)
                                assert torch.equal(t["labels"], torch.as_tensor(ref["labels"][key])), (rows, key)
                                for k, n in enumerate([n for _, ns in examples for n in ns]):
                                    assert np.allclose(t["pixel_values"][k].numpy(), pix[n], atol=0, rtol=0), n
                            ref["trl_checked"] = True
                    if tn != "llava_hf":
                        # assistant mask by rendering prefixes (vsft's rule for templates without
                        # {% generation %}), mapped onto tokens with transformers' own offset logic
                        spans = []
                        for m, full in zip(msgs, texts):
                            sp = []
                            for k, mm in enumerate(m):
                                if mm["role"] != "assistant":
                                    continue
                                before = proc.apply_chat_template([m[:k]], chat_template=tt, tokenize=False,
                                                                  add_generation_prompt=True)[0]
                                upto = proc.apply_chat_template([m[:k + 1]], chat_template=tt, tokenize=False)[0]
                                assert upto.startswith(before) and full.startswith(upto)
                                sp.append((len(before), len(upto)))
                            spans.append(sp)
                        o4 = proc(text=texts, images=images, padding=True, padding_side="right",
                                  add_special_tokens=ast_eff, return_offsets_mapping=True,
                                  return_text_replacement_offsets=True, return_tensors=None)
                        o4 = proc._adjust_assistant_masks_indices(o4, spans)
                        assert o4["input_ids"] == ids.tolist()
                        lab_a = ids.clone()
                        lab_a[am == 0] = -100
                        lab_a[torch.as_tensor(o4["assistant_masks"]) == 0] = -100
                        ref["labels"]["assistant"] = as_list(lab_a)
                    refs.append(ref)

    # the bad-row fixtures (each names one problem)
    bad_dir = os.path.join(OUT, "bad")
    os.makedirs(bad_dir)
    ok = TRAIN_ROWS[7]
    write_parquet(os.path.join(bad_dir, "corrupt_image.parquet"), [ok, ok],
                  {**imgs, "exact.png": imgs["exact.png"]})
    # overwrite row 1's image bytes with garbage
    t = pq.read_table(os.path.join(bad_dir, "corrupt_image.parquet")).to_pylist()
    t[1]["images"][0]["bytes"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
    pq.write_table(pa.Table.from_pylist(t, schema=pq.read_schema(os.path.join(bad_dir, "corrupt_image.parquet"))),
                   os.path.join(bad_dir, "corrupt_image.parquet"))
    write_parquet(os.path.join(bad_dir, "count_mismatch.parquet"),
                  [ok, ({"messages": [msg("user", I(0), I(1), T("two?")), msg("assistant", T("one"))]}, ["exact.png"])], imgs)
    write_parquet(os.path.join(bad_dir, "empty_conversation.parquet"), [ok, ({"messages": []}, [])], imgs)
    write_parquet(os.path.join(bad_dir, "unknown_role.parquet"),
                  [ok, ok, ({"messages": [msg("robot", T("beep"))]}, [])], imgs)
    pq.write_table(pa.table({"messages": pa.array([[{"role": "user", "content": [{"index": None, "text": "hi", "type": "text"}]}]])}),
                   os.path.join(bad_dir, "missing_column.parquet"))
    pq.write_table(pa.table({"messages": pa.array(["not a list"]), "images": pa.array([[]], pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])))}),
                   os.path.join(bad_dir, "wrong_type.parquet"))
    with open(os.path.join(bad_dir, "llava_bad_role.json"), "w") as f:
        json.dump([{"id": "a", "image": "exact.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]},
                   {"id": "b", "image": "exact.png", "conversations": [{"from": "alien", "value": "<image>\nhi"}]}], f)
    with open(os.path.join(bad_dir, "llava_missing_image.json"), "w") as f:
        json.dump([{"id": "a", "image": "does_not_exist.jpg", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]}], f)

    meta = {
        "versions": {"transformers": transformers.__version__, "trl": trl.__version__, "torch": torch.__version__,
                     "tokenizers": __import__("tokenizers").__version__, "PIL": Image.__version__},
        "pad_token_id": pad_id, "image_token_id": image_id, "bos_token_id": tok.bos_token_id,
        "image_seq_length": (CROP // PATCH) ** 2, "crop": CROP,
        "train_files": [f"train-{k:05d}-of-{len(TRAIN_SHARDS):05d}.parquet" for k in range(len(TRAIN_SHARDS))],
        "n_train": len(TRAIN_ROWS), "n_test": len(TEST_ROWS),
        "images": stats, "rendered": rendered, "batches": refs,
        "llava_json_ids": [e["id"] for e in llava],
    }
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    log(f"wrote {OUT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
