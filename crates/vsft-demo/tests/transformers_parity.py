"""Writes tests/fixtures/transformers.json: what transformers' LlavaProcessor makes of the
first rows of the demo dataset with the demo model files, for tests/parity.rs.

    cargo test --release -p vsft-demo --test dataset   # writes target/tmp/vsft-demo/full
    python crates/vsft-demo/tests/transformers_parity.py target/tmp/vsft-demo/full

Verified with transformers 5.24, datasets 5.2, tokenizers 0.23.3.
"""
import json
import shutil
import sys
from pathlib import Path

import datasets
import numpy as np
from transformers import AutoProcessor

root = Path(sys.argv[1])
model = root / "model"
here = Path(__file__).parent
shutil.copy(here / "../../../configs/demo-tiny-llava.json", model / "config.json")
proc = AutoProcessor.from_pretrained(model)
out = []
for name, split in [("captions", "train"), ("qa", "train"), ("qa", "test")]:
    ds = datasets.load_dataset(str(root / "data" / name), split=split)
    for i in range(3):
        row = ds[i]
        text = proc.apply_chat_template(row["messages"], tokenize=False)
        b = proc(text=[text], images=row["images"], return_tensors="np")
        m = proc.tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        px = b["pixel_values"][0].astype(np.float64)
        out.append({
            "dataset": name, "split": split, "row": i, "text": text,
            "input_ids": b["input_ids"][0].tolist(),
            "assistant_masks": m["assistant_masks"],  # without BOS or <image> expansion
            "pixel_sum": float(px.sum()), "pixel_first": px.reshape(-1)[:16].tolist(),
            "generation_prompt": proc.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True),
        })
(here / "fixtures").mkdir(exist_ok=True)
(here / "fixtures/transformers.json").write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {len(out)} rows")
