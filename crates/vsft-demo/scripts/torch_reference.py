"""PyTorch/transformers reference for the demo: trains the demo model config from random
init on the shapes dataset (stage 1 captions, then stage 2 Q&A; all parameters; loss on the
answers and their </s> only), and prints held-out accuracy per question kind every 250 steps.
It tells what vsft's own demo run should reach for a given number of steps.

    cargo run --release -p vsft-demo --example write_demo -- /tmp/demo
    python crates/vsft-demo/scripts/torch_reference.py /tmp/demo --device cpu --threads 1

Seen (transformers 5.24, torch 2.15 CPU, 1 thread, ~0.13 s/step at batch 16; dataset from
`write_demo /tmp/demo n_captions=4000 n_qa_train=12000 max_turns=5`, default options here:
stage 1 = 250 steps, stage 2 = 1500 steps), held-out accuracy at
steps 500 / 750 / 1000 / 1250 / 1500 / 1750 (counting stage 1's):
    all     68 72 76 76 80 78 %     colour    75 85 75 78 82 88 %
    count   100 98 100 100 100 100  colour-at 60 70 78 78 70 68
    place   62 68 78 75 82 75       shape     40 40 48 52 62 62
Shape (and so colour-of-a-named-shape in two-object pictures) is what takes longest; on a
3000-row Q&A set, 10 epochs overfit (train loss kept falling, held-out accuracy stalled at
~75%); with the default 3000 rows, 4-5 epochs after 1 of captions gave 72-74% overall.
"""
import argparse, io, math, time

import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

ap = argparse.ArgumentParser()
ap.add_argument("dir", help="the OUT of the write_demo example (data/ and model/)")
ap.add_argument("--device", default="cpu")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--stage1-epochs", type=int, default=1)
ap.add_argument("--stage2-epochs", type=int, default=2)
ap.add_argument("--lr", type=float, default=5e-4)
ap.add_argument("--batch-size", type=int, default=16)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
torch.set_num_threads(a.threads)
dev = a.device
proc = AutoProcessor.from_pretrained(f"{a.dir}/model")
tok = proc.tokenizer
V = tok.get_vocab()
ASSIST, COLON, EOS, PAD = V["ASSISTANT"], V[":"], V["</s>"], V["<pad>"]
cfg = LlavaConfig.from_pretrained(f"{a.dir}/model")


def load(path):
    return [(r["messages"], Image.open(io.BytesIO(r["images"][0]["bytes"])).convert("RGB")) for r in pq.read_table(path).to_pylist()]


def encode(rows):
    out = []
    for msgs, img in rows:
        b = proc(text=proc.apply_chat_template(msgs, tokenize=False), images=img, return_tensors="pt")
        ids = b["input_ids"][0]
        lab = torch.full_like(ids, -100)
        on = False
        for k in range(len(ids)):  # answers: after "ASSISTANT :" up to and including </s>
            on = on or (k >= 2 and ids[k - 2] == ASSIST and ids[k - 1] == COLON)
            if on:
                lab[k] = ids[k]
            on = on and ids[k] != EOS
        out.append((ids, lab, b["pixel_values"][0]))
    return out


def kind(q):
    for p, k in [("What colour is the shape", "colour-at"), ("What colour", "colour"), ("Which shape", "shape"), ("Where", "place"), ("How many", "count")]:
        if q.startswith(p):
            return k


caps = encode(load(f"{a.dir}/data/captions/data/train-00000-of-00001.parquet"))
qa = encode(load(f"{a.dir}/data/qa/data/train-00000-of-00001.parquet"))
test = load(f"{a.dir}/data/qa/data/test-00000-of-00001.parquet")
tok.padding_side = "left"
prompts = [proc.apply_chat_template(m[:1], tokenize=False, add_generation_prompt=True) for m, _ in test]
tb = proc(text=prompts, images=[i for _, i in test], return_tensors="pt", padding=True)
answers = [m[1]["content"][0]["text"] for m, _ in test]
kinds = [kind(m[0]["content"][1]["text"]) for m, _ in test]


def collate(batch):
    n = max(len(b[0]) for b in batch)
    ids = torch.full((len(batch), n), PAD)
    lab = torch.full((len(batch), n), -100)
    att = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (x, l, _) in enumerate(batch):
        ids[i, : len(x)], lab[i, : len(x)], att[i, : len(x)] = x, l, 1
    return ids.to(dev), lab.to(dev), att.to(dev), torch.stack([b[2] for b in batch]).to(dev)


@torch.no_grad()
def evaluate(model):
    model.eval()
    out = model.generate(**{k: v.to(dev) for k, v in tb.items()}, max_new_tokens=4, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    gen = tok.batch_decode(out[:, tb["input_ids"].shape[1]:], skip_special_tokens=True)
    acc = {}
    for g, ans, k in zip(gen, answers, kinds):
        acc.setdefault(k, []).append(g.strip().split(" ")[0].strip(".").lower() == ans.strip("."))
    model.train()
    res = {k: round(100 * sum(v) / len(v)) for k, v in sorted(acc.items())}
    res["all"] = round(100 * sum(sum(v) for v in acc.values()) / len(gen))
    return res


torch.manual_seed(a.seed)
model = LlavaForConditionalGeneration(cfg).to(dev)
params = list(model.parameters())
g = torch.Generator().manual_seed(a.seed)
t0, step, bs = time.time(), 0, a.batch_size
for si, (data, epochs) in enumerate([(caps, a.stage1_epochs), (qa, a.stage2_epochs)]):
    if epochs == 0:
        continue
    steps = epochs * (len(data) // bs)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    warm = max(1, steps // 20)  # 5% linear warmup, then cosine to 0, per stage
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1, s / steps))))
    for ep in range(epochs):
        perm = torch.randperm(len(data), generator=g).tolist()
        for i in range(len(data) // bs):
            ids, lab, att, px = collate([data[j] for j in perm[i * bs:(i + 1) * bs]])
            loss = model(input_ids=ids, attention_mask=att, pixel_values=px, labels=lab).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step(); sched.step(); opt.zero_grad()
            step += 1
            if step % 50 == 0:
                print(f"stage {si + 1} step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
            if si == 1 and step % 250 == 0:
                print(f"stage {si + 1} step {step} held-out accuracy {evaluate(model)}", flush=True)
print(f"final: step {step} {time.time() - t0:.0f}s held-out accuracy {evaluate(model)}", flush=True)
