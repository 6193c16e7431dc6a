#!/usr/bin/env python3
"""Loads aec sequence-model checkpoints into PyTorch (nn.GRU / nn.LSTM / nn.RNN) and checks that
both compute the same network: the code (`aec encode`) to 1e-5, and greedy decoding (`aec run`)
token for token.

For each cell (the seq_copy spec with its `gru` layers replaced by `lstm` or `rnn`): train one
epoch with `aec run --train`, generate the torch module with `aec compile --emit torch`, load
`checkpoint.safetensors` with `load_state_dict(strict=True)`, and compare on held-out sequences.

    ../torch-venv/bin/python tests/torch/check_seq.py

Needs the release binary (`cargo build --release`). Not part of `cargo test`: CI has no torch.
"""

import importlib.util
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
AEC = ROOT / "target" / "release" / "aec"


def aec(*args):
    return subprocess.run([str(AEC), *map(str, args)], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def check(cell, work):
    src = (ROOT / "specs" / "seq_copy.ae").read_text().replace("gru", cell)
    spec = work / f"seq_{cell}.ae"
    spec.write_text(src)
    run = work / f"run_{cell}"
    aec("run", "--train", spec, "--epochs", "2", "--out", run)
    module_path = work / f"seq_{cell}_model.py"
    module_path.write_text(aec("compile", spec, "--emit", "torch"))
    loader = importlib.util.spec_from_file_location(f"seq_{cell}_model", module_path)
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    model = mod.Model().eval()
    model.load_state_dict(load_file(str(run / "checkpoint.safetensors")), strict=True)

    x = np.random.default_rng(1).integers(0, 10, size=(200, 8)).astype(np.int32)
    np.save(work / "x.npy", x)
    weights = run / "checkpoint.safetensors"
    aec("run", spec, "--weights", weights, "--input", work / "x.npy", "--output", work / "y.npy")
    aec("encode", spec, "--weights", weights, "--input", work / "x.npy", "--output", work / "z.npy")
    with torch.no_grad():
        ids, code = model(torch.from_numpy(x).long())
        probs, _ = model(torch.from_numpy(x).long(), torch.from_numpy(x).long())
    ids_aec = np.load(work / "y.npy")
    code_aec = np.load(work / "z.npy")
    code_err = float(np.abs(code.numpy() - code_aec).max())
    same = float((ids.numpy() == ids_aec).mean())
    forced = float((probs.argmax(-1).numpy() == x).mean())
    print(f"{cell}: code max |diff| {code_err:.2e}; greedy ids agree on {same:.2%} of tokens "
          f"(torch's teacher-forced token accuracy {forced:.1%})")
    assert code_err < 1e-5, cell
    assert same == 1.0, cell


def main():
    with tempfile.TemporaryDirectory() as tmp:
        for cell in ["gru", "lstm", "rnn"]:
            check(cell, Path(tmp))


if __name__ == "__main__":
    main()
