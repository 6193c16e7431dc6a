#!/usr/bin/env python3
"""AdamW in aec against `torch.optim.AdamW`, step by step.

8-3-8 (one full batch per epoch, so the steps see the same data in both) trains K steps with
`adamw(lr: 0.05, weight_decay: 0.1)` in aec; PyTorch starts from aec's initial parameters (an
aec run at SGD lr 1e-30 keeps them) and takes the same K steps with `torch.optim.AdamW` and
`BCELoss` plus the spec's l2 term. Losses and parameters must agree to 1e-6 (relative to the
parameters' scale).

    cargo build --release && ../torch-venv/bin/python tests/torch/check_adamw.py
"""

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
AEC = ROOT / "target" / "release" / "aec"
STEPS, LR, WD = 20, 0.05, 0.1


def aec(*args):
    return subprocess.run([str(AEC), *map(str, args)], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def run(text, optimizer, epochs, work, tag):
    text = re.sub(r"optimizer\s+[^\n]*", f"optimizer {optimizer}", text)
    text = re.sub(r"\n(\s*)epochs\s+[^\n]*", rf"\n\g<1>epochs {epochs}", text)
    path = work / f"{tag}.ae"
    path.write_text(text)
    aec("run", "--train", path, "--out", work / tag)
    losses = [json.loads(l)["train_loss"] for l in (work / tag / "metrics.jsonl").read_text().splitlines()]
    return losses, load_file(work / tag / "checkpoint.safetensors")


def main():
    torch.set_num_threads(1)
    text = (ROOT / "specs" / "onehot838.ae").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, init = run(text, "sgd(lr: 1e-30)", 1, work, "init")
        ours, after = run(text, f"adamw(lr: {LR}, weight_decay: {WD})", STEPS, work, "adamw")
        (work / "m.py").write_text(aec("compile", work / "init.ae", "--emit", "torch"))
        loader = importlib.util.spec_from_file_location("m", work / "m.py")
        mod = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(mod)
        model = mod.Model()
        model.load_state_dict(init, strict=True)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
        x = torch.eye(8)
        theirs = []
        for _ in range(STEPS):
            opt.zero_grad()
            recon, _ = model(x)
            l2 = sum((p**2).sum() for n, p in model.named_parameters() if n.endswith("weight"))
            loss = torch.nn.functional.binary_cross_entropy(recon, x) + 1e-4 * l2
            loss.backward()
            opt.step()
            theirs.append(loss.item())
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
        param_err = max((after[k] - v).abs().max().item() / v.abs().max().item() for k, v in model.state_dict().items())
    print(f"AdamW over {STEPS} steps: losses {loss_err:.1e}, parameters {param_err:.1e} (relative)")
    sys.exit(0 if loss_err < 1e-6 and param_err < 1e-6 else 1)


if __name__ == "__main__":
    main()
