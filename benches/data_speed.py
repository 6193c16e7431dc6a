#!/usr/bin/env python3
"""How fast aec reads data: (1) training samples/s of bench_conv28's network on a u8 `.npy`
read a batch at a time against the same file read whole (`AEC_DATA=memory`), the two runs
alternated, medians over rounds; (2) images/s of the first decode of a folder of 1,000 JPEG
files (256 × 256 crops of the shipped photographs), and of a second run that finds the cache.

    cargo build --release && ../torch-venv/bin/python benches/data_speed.py [--rounds 3]

Needs numpy and Pillow. Not part of `cargo test`.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
AEC = ROOT / "target" / "release" / "aec"

SPEC = """model conv28 {{
    input x: [1, 28, 28]
    encoder {{ conv 16 k3 p1 -> relu; maxpool 2 as p1; conv 32 k3 p1 -> relu; maxpool 2 as p2 }}
    decoder {{ unpool p2; deconv 16 k3 p1 -> relu; unpool p1; deconv 1 k3 p1 -> sigmoid }}
    loss mse(x)
}}
train {{ data {data}; batch 64; epochs 3; optimizer adam(lr: 1e-3); seed 1 }}
"""


def run(args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([str(AEC), *map(str, args)], check=True, capture_output=True, text=True, env=e)


def rate(tmp, env):
    out = tmp / "run"
    run(["run", "--train", tmp / "conv28.ae", "--out", out], env)
    epochs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    # The first epoch includes code generation's warm-up: the later ones.
    rates = sorted(e["samples_per_s"] for e in epochs[1:])
    waits = [e["data_wait_s"] for e in epochs[1:]]
    return rates[len(rates) // 2], max(waits)


def main():
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        np.save(tmp / "x.npy", rng.integers(0, 256, size=(60000, 1, 28, 28), dtype=np.uint8))
        (tmp / "conv28.ae").write_text(SPEC.format(data=f'npy("{tmp}/x.npy", scale: 1/255)'))
        got = {"stored": [], "memory": []}
        wait = 0.0
        for _ in range(rounds):
            r, w = rate(tmp, {})
            got["stored"].append(r)
            wait = max(wait, w)
            got["memory"].append(rate(tmp, {"AEC_DATA": "memory"})[0])
        med = {k: sorted(v)[len(v) // 2] for k, v in got.items()}
        print(
            f"conv28 on 60000 u8 samples: read a batch at a time {med['stored']:.0f} samples/s, "
            f"read whole {med['memory']:.0f} samples/s ({med['stored'] / med['memory']:.3f}×); "
            f"longest wait for data in an epoch {wait * 1000:.1f} ms"
        )

        folder = tmp / "jpegs"
        folder.mkdir()
        photos = sorted((ROOT / "specs" / "data" / "photos").glob("*/*"))
        sources = [Image.open(p).convert("RGB") for p in sorted((ROOT.parent / "shared" / "data" / "photos").glob("*.*"))]
        if not sources:
            sources = [Image.open(p).convert("RGB").resize((512, 512)) for p in photos[:20]]
        for i in range(1000):
            img = sources[i % len(sources)]
            w, h = img.size
            s = 512 / min(w, h)
            img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
            x, y = rng.integers(0, img.size[0] - 256 + 1), rng.integers(0, img.size[1] - 256 + 1)
            img.crop((x, y, x + 256, y + 256)).save(folder / f"{i:04d}.jpg", quality=90)
        spec = tmp / "photos.ae"
        spec.write_text(
            SPEC.replace("[1, 28, 28]", "[3, 64, 64]")
            .replace("deconv 1 k3", "deconv 3 k3")
            .format(data=f'images("{folder}")')
            .replace("epochs 3", "epochs 1")
        )
        cache = {"AEC_CACHE_DIR": str(tmp / "cache")}
        for what in ["first run (decodes)", "second run (cached)"]:
            t = time.perf_counter()
            err = run(["run", "--train", spec, "--out", tmp / "photos-run"], cache).stderr
            total = time.perf_counter() - t
            m = re.search(r"decoded (\d+) images .* \((\d+) images/s\)", err)
            said = f"decoded {m.group(1)} JPEGs at {m.group(2)} images/s" if m else "no decoding"
            print(f"folder of 1000 JPEGs 256×256 → [3, 64, 64], {what}: {said}; whole command {total:.2f} s")


if __name__ == "__main__":
    main()
