#!/usr/bin/env python3
"""Acceptance check for `vsft export` (issue: export and the Hub), run by hand where torch,
transformers and peft are installed:

- the exported adapter loads with `PeftModel.from_pretrained` on the base model, and its logits
  equal vsft's on the same batch (vsft side: `vsft logits --model BASE --adapter ADAPTER`);
- the merged export loads with `LlavaForConditionalGeneration.from_pretrained`, same check.

    python scripts/check_export.py --vsft target/release/vsft --base BASE --adapter ADAPTER --merged MERGED
Prints one JSON object with the max abs differences; exits non-zero above 1e-4.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vsft", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--merged", required=True)
    a = ap.parse_args()
    base = LlavaForConditionalGeneration.from_pretrained(a.base, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = base.config
    g = torch.Generator().manual_seed(0)
    n_img = cfg.image_seq_length
    rows = []
    for n in (9, 5):
        text = torch.randint(3, 1000, (n,), generator=g).tolist()
        rows.append([1] + [cfg.image_token_index] * n_img + text)
    width = max(map(len, rows))
    ids = torch.tensor([r + [cfg.pad_token_id] * (width - len(r)) for r in rows])
    mask = (ids != cfg.pad_token_id).long()
    s = cfg.vision_config.image_size
    pix = torch.randn((2, 3, s, s), generator=g)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "inputs.safetensors")
        save_file({"input_ids": ids, "attention_mask": mask, "pixel_values": pix}, inputs)

        def vsft_logits(model, adapter=None):
            dst = os.path.join(tmp, "logits.safetensors")
            cmd = [a.vsft, "logits", "--model", model, "--inputs", inputs, "--out", dst]
            if adapter:
                cmd += ["--adapter", adapter]
            subprocess.run(cmd, check=True)
            return load_file(dst)["logits"]

        peft_model = PeftModel.from_pretrained(base, a.adapter).eval()
        with torch.no_grad():
            ref = peft_model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        out["adapter_vs_peft_max_abs_diff"] = (vsft_logits(a.base, a.adapter) - ref).abs().max().item()
        merged = LlavaForConditionalGeneration.from_pretrained(a.merged, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            ref_m = merged(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        out["merged_transformers_vs_peft_max_abs_diff"] = (ref_m - ref).abs().max().item()
        out["merged_vsft_vs_transformers_max_abs_diff"] = (vsft_logits(a.merged) - ref_m).abs().max().item()
    print(json.dumps(out))
    if max(out.values()) > 1e-4:
        sys.exit("export check failed")


if __name__ == "__main__":
    main()
