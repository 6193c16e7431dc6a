#!/usr/bin/env python3
"""Builds specs/data/photos/: 64 × 64 tiles of eleven real photographs, one sub-folder per
photograph (its name is the label `images(…)` gives its tiles).

Each photograph is scaled (Pillow, bilinear) so that its shorter side is 256 pixels, then cut
into 64 × 64 tiles every 48 pixels across and down. Colour photographs give JPEG tiles
(quality 90), grey ones PNG tiles, as the originals are: the folder mixes both formats, colour
and grey, on purpose.

    ../torch-venv/bin/python specs/data/photos/build.py ../shared/data

Needs numpy and Pillow. The tiles it wrote are committed; a fresh clone does not run this.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent
SIDE, TILE, STRIDE = 256, 64, 48


def photographs(shared):
    for p in sorted((shared / "photos").iterdir()):
        if p.suffix in (".png", ".jpg"):
            yield p.stem, Image.open(p)
    for name in ("camera", "coins"):
        yield name, Image.fromarray(np.load(shared / f"{name}.npy").astype(np.uint8))


def main():
    shared = Path(sys.argv[1] if len(sys.argv) > 1 else OUT.parents[2].parent / "shared" / "data")
    total = 0
    for name, img in photographs(shared):
        img = img.convert("L") if img.mode in ("L", "I", "I;16") else img.convert("RGB")
        w, h = img.size
        s = SIDE / min(w, h)
        img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
        folder = OUT / name
        folder.mkdir(exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        w, h = img.size
        for y in range(0, h - TILE + 1, STRIDE):
            for x in range(0, w - TILE + 1, STRIDE):
                tile = img.crop((x, y, x + TILE, y + TILE))
                if img.mode == "L":
                    tile.save(folder / f"{y:03d}-{x:03d}.png", optimize=True)
                else:
                    tile.save(folder / f"{y:03d}-{x:03d}.jpg", quality=90)
                total += 1
    print(f"{total} tiles in {OUT}")


if __name__ == "__main__":
    main()
