#!/usr/bin/env python3
"""Loads aec checkpoints into PyTorch and checks that both compute the same network.

For each spec: train it briefly with `aec run --train`, generate the equivalent torch module with
`aec compile --emit torch`, load `checkpoint.safetensors` with `load_state_dict(strict=True)`,
and compare torch's forward pass with `aec run` and `aec encode` on the same random inputs.

Run from the repository root with a Python that has torch, numpy and safetensors:

    ../torch-venv/bin/python tests/torch/check_checkpoint.py [SPEC ...]

Needs the release binary (`cargo build --release`). Not part of `cargo test`: CI has no torch.
"""

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
AEC = ROOT / "target" / "release" / "aec"
DEFAULT = ["onehot838", "digits_mlp", "digits_conv", "digits_deconv", "mirror", "strokes", "denoise", "coins_seg", "vae_digits", "vae_conv", "beta_vae"]


def aec(*args):
    return subprocess.run([str(AEC), *map(str, args)], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def input_shape(spec):
    """The per-sample input shape, from the layer table's `input` row."""
    for line in aec("compile", spec).splitlines():
        if line.startswith("input "):
            dims = line[line.index("[") + 1 : line.index("]")]
            return [int(d) for d in dims.split(",")]
    raise SystemExit(f"{spec}: no input row")


def check(name, work):
    spec = ROOT / "specs" / f"{name}.ae"
    run = work / name
    aec("run", "--train", spec, "--epochs", "1", "--out", run)
    module_path = work / f"{name}_model.py"
    module_path.write_text(aec("compile", spec, "--emit", "torch"))
    loader = importlib.util.spec_from_file_location(f"{name}_model", module_path)
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    model = mod.Model().eval()
    state = load_file(str(run / "checkpoint.safetensors"))
    model.load_state_dict(state, strict=True)

    x = np.random.default_rng(0).random([5] + input_shape(spec), dtype=np.float32)
    np.save(work / "x.npy", x)
    aec("run", spec, "--weights", run / "checkpoint.safetensors", "--input", work / "x.npy", "--raw-input", "--output", work / "y.npy")
    aec("encode", spec, "--weights", run / "checkpoint.safetensors", "--input", work / "x.npy", "--raw-input", "--output", work / "z.npy")
    with torch.no_grad():
        recon, code = model(torch.from_numpy(x))
    dy = np.abs(np.load(work / "y.npy") - recon.numpy()).max()
    dz = np.abs(np.load(work / "z.npy") - code.numpy()).max()
    ok = dy < 1e-4 and dz < 1e-4
    print(f"{name:14} strict load ok, {len(state):2} tensors; max |aec - torch|: output {dy:.2e}, code {dz:.2e}  {'ok' if ok else 'MISMATCH'}")
    return ok


def main():
    names = sys.argv[1:] or DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        results = [check(n, Path(tmp)) for n in names]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
