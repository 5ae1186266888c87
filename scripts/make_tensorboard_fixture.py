#!/usr/bin/env python3
"""Reference fixture for vsft's TensorBoard event files (issue: training you can watch).

Runs `vsft train` with `report_to = ["jsonl", "tensorboard"]` on a tiny model (stage 2 with an
eval set, so that train and eval scalars both appear), then reads the event file it wrote with
TensorBoard's own reader (`EventAccumulator`) and checks that every tag, step and value is what
`metrics.jsonl` says, named as transformers' TensorBoardCallback names them (`rewrite_logs`:
`eval_loss` -> `eval/loss`, `loss` -> `train/loss`). Writes the run's metrics.jsonl and what the
reader read to tests/fixtures/tensorboard/; the Rust test writes an event file from the same
metrics and parses it into what the reader read.

    cargo build --release -p vsft
    python scripts/make_tensorboard_fixture.py
"""
import glob
import json
import os
import shutil
import subprocess
import tempfile

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VSFT = os.path.join(ROOT, "target", "release", "vsft")
OUT = os.path.join(ROOT, "tests", "fixtures", "tensorboard")


def rewrite_logs(d):
    """transformers.integrations.integration_utils.rewrite_logs"""
    out = {}
    for k, v in d.items():
        if k.startswith("eval_"):
            out["eval/" + k[len("eval_"):]] = v
        elif k.startswith("test_"):
            out["test/" + k[len("test_"):]] = v
        else:
            out["train/" + k] = v
    return out


def main():
    tmp = tempfile.mkdtemp()
    model = os.path.join(tmp, "model")
    subprocess.run([VSFT, "init", "--config", os.path.join(ROOT, "configs", "tiny-llava-e2e.json"),
                    "--tokenizer-from", os.path.join(ROOT, "tests", "fixtures", "data", "model"), "--out", model], check=True)
    data = os.path.join(ROOT, "tests", "fixtures", "data", "llava_instruct_mix")
    out = os.path.join(tmp, "out")
    recipe = os.path.join(tmp, "recipe.toml")
    with open(recipe, "w") as f:
        f.write(f"""[model]
path = "{model}"
[data]
train = "{data}"
eval = "{data}"
max_length = 512
label_mask = "assistant"
num_workers = 1
[train]
stage = "instruct"
output_dir = "{out}"
max_steps = 6
batch_size = 2
lr = 1e-3
log_steps = 1
eval_steps = 3
save_steps = 100
report_to = ["jsonl", "tensorboard"]
[lora]
r = 4
alpha = 8
""")
    subprocess.run([VSFT, "train", "--config", recipe], check=True)

    files = glob.glob(os.path.join(out, "runs", "events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(files[0], size_guidance={"scalars": 0})
    acc.Reload()
    read = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in sorted(acc.Tags()["scalars"])}

    # What metrics.jsonl says, as TensorBoardCallback would log it.
    expected = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    for rec in lines:
        step = rec["step"]
        for tag, v in rewrite_logs({k: v for k, v in rec.items() if k != "step"}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                expected.setdefault(tag, []).append([step, v])
    assert sorted(read) == sorted(expected), (sorted(read), sorted(expected))
    for tag in read:
        got, want = read[tag], expected[tag]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        for (_, a), (_, b) in zip(got, want):
            assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (tag, a, b)  # stored as float32
    for tag in ["train/loss", "eval/loss", "train/learning_rate", "train/grad_norm", "train/mean_token_accuracy", "eval/mean_token_accuracy"]:
        assert tag in read, f"{tag} missing from {sorted(read)}"

    os.makedirs(OUT, exist_ok=True)
    shutil.copy(os.path.join(out, "metrics.jsonl"), os.path.join(OUT, "metrics.jsonl"))
    with open(os.path.join(OUT, "reader.json"), "w") as f:
        json.dump({"tags": read}, f, indent=1)
    print(f"{len(read)} tags, {sum(len(v) for v in read.values())} scalars read back by EventAccumulator: equal to metrics.jsonl")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
