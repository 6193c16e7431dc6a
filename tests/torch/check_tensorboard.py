#!/usr/bin/env python3
"""Reads a run folder's event file with TensorBoard's own reader and compares it with
`metrics.jsonl`: every epoch's training and validation loss and terms, the learning rate, and
the `--png-every` pictures as images.

    cargo build --release && ../torch-venv/bin/pip install tensorboard
    ../torch-venv/bin/python tests/torch/check_tensorboard.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[2]
AEC = ROOT / "target" / "release" / "aec"


def main():
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run([str(AEC), "run", "--train", "specs/digits_conv.ae", "--epochs", "4", "--png-every", "2",
                        "--out", str(run)], cwd=ROOT, check=True, capture_output=True)
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        tags = acc.Tags()
        problems = []
        for tag, key in [("loss/train", "train_loss"), ("loss/validation", "val_loss")]:
            got = [(e.step, e.value) for e in acc.Scalars(tag)]
            want = [(m["epoch"], m[key]) for m in metrics]
            if len(got) != len(want) or any(s != t or abs(v - w) > 1e-6 * abs(w) for (s, v), (t, w) in zip(got, want)):
                problems.append(f"{tag}: {got} vs {want}")
        for name in metrics[0]["terms"]:
            if f"loss/train/{name}" not in tags["scalars"]:
                problems.append(f"no loss/train/{name}")
        if "learning_rate" not in tags["scalars"]:
            problems.append("no learning_rate")
        images = acc.Images("pictures") if "pictures" in tags["images"] else []
        if [i.step for i in images] != [2, 4] or any(i.encoded_image_string[:4] != b"\x89PNG" for i in images):
            problems.append(f"pictures at steps {[i.step for i in images]}")
    print("\n".join(problems) or f"TensorBoard reads {len(metrics)} epochs of scalars and {len(images)} pictures, as metrics.jsonl has them")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
