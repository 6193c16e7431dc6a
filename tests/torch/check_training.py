#!/usr/bin/env python3
"""Trains 8-3-8 in aec and in PyTorch from the same state and compares the loss curves.

aec trains one epoch (one full batch) and writes its checkpoint; both then continue for 200
steps from that state — parameters and SGD momentum buffers — aec with `--resume`, PyTorch with
the module from `aec compile --emit torch`, `MSELoss` and `torch.optim.SGD`. Autodiff, the loss
and the optimizer must agree step by step.

    cargo build --release && ../torch-venv/bin/python tests/torch/check_training.py
"""

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
AEC = ROOT / "target" / "release" / "aec"
SPEC = ROOT / "specs" / "onehot838.ae"
STEPS = 200


def aec(*args):
    return subprocess.run([str(AEC), *map(str, args)], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def main():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start, run = tmp / "start", tmp / "run"
        aec("run", "--train", SPEC, "--epochs", 1, "--out", start)
        shutil.copytree(start, run)
        aec("run", "--train", SPEC, "--epochs", STEPS + 1, "--resume", run)
        ours = [json.loads(l)["train_loss"] for l in (run / "metrics.jsonl").read_text().splitlines()][1:]

        (tmp / "m.py").write_text(aec("compile", SPEC, "--emit", "torch"))
        loader = importlib.util.spec_from_file_location("m", tmp / "m.py")
        mod = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(mod)
        model = mod.Model()
        model.load_state_dict(load_file(str(start / "checkpoint.safetensors")), strict=True)
        opt = torch.optim.SGD(model.parameters(), lr=5.0, momentum=0.9)
        buffers = load_file(str(start / "optimizer.safetensors"))
        for name, p in model.named_parameters():
            opt.state[p]["momentum_buffer"] = buffers[f"{name}.momentum_buffer"].clone()
        x = torch.eye(8)
        theirs = []
        for _ in range(STEPS):
            opt.zero_grad()
            recon, _ = model(x)
            loss = torch.nn.functional.mse_loss(recon, x)
            loss.backward()
            opt.step()
            theirs.append(loss.item())

    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, theirs))
    for i in (0, 1, 9, 99, STEPS - 1):
        print(f"step {i + 2:4}: aec {ours[i]:.8f}  torch {theirs[i]:.8f}")
    print(f"largest relative difference over {STEPS} steps: {worst:.2e}")
    sys.exit(0 if len(ours) == STEPS and worst < 1e-3 else 1)


if __name__ == "__main__":
    main()
