#!/usr/bin/env python3
"""Trains the U-Net and SegNet specs in aec and in PyTorch from the same state, step by step.

Links (`concat`, `add`), batch normalization and upsampling against their PyTorch twins, on the
module `aec compile --emit torch` writes. For each spec, on one batch of eight real patches
(the coins photograph and its mask, or the camera photograph):

- the gradients of the first step (an aec run with SGD at lr 1 moves each parameter by minus
  its gradient), against `loss.backward()` in training mode (batch statistics);
- the loss of each of STEPS Adam steps, the parameters after them, the running statistics
  (`running_mean`, unbiased `running_var` with momentum, `num_batches_tracked`);
- the evaluation output (running statistics; aec folds them into the convolutions), and the
  same from PyTorch's own `state_dict` (its batch counts int64) run by `aec run --weights`.

Every epoch is the one batch, so aec's shuffling only permutes it (batch statistics and the
mean loss do not depend on the order, up to rounding).

    cargo build --release && ../torch-venv/bin/python tests/torch/check_links.py [SPEC ...]

Not part of `cargo test`: CI has no torch.
"""

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
AEC = ROOT / "target" / "release" / "aec"
DEFAULT = ["unet_coins", "segnet_coins", "unet_denoise"]
BATCH, STEPS, SEED = 8, 5, 3


def aec(*args):
    return subprocess.run([str(AEC), *map(str, args)], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def patches(name, size, scale):
    """Eight size × size patches of a shipped photograph, spread over it."""
    img = np.load(ROOT / "specs" / "data" / f"{name}.npy").astype(np.float32) * scale
    h, w = img.shape[-2:]
    rows = np.linspace(0, h - size, BATCH).astype(int)
    cols = np.linspace(0, w - size, BATCH).astype(int)[::-1]
    return np.stack([img[r : r + size, c : c + size] for r, c in zip(rows, cols)])[:, None].copy()


def train(spec_text, optimizer, epochs, work, tag):
    text = re.sub(r"optimizer\s+[^\n]*", f"optimizer {optimizer}", spec_text)
    text = re.sub(r"\n(\s*)epochs\s+[^\n]*", rf"\n\g<1>epochs {epochs}", text)
    path = work / f"{tag}.ae"
    path.write_text(text)
    aec("run", "--train", path, "--out", work / tag)
    losses = [json.loads(l)["train_loss"] for l in (work / tag / "metrics.jsonl").read_text().splitlines()]
    return losses, load_file(work / tag / "checkpoint.safetensors")


def check(name, work):
    spec_text = (ROOT / "specs" / f"{name}.ae").read_text()
    size = int(re.search(r"input\s+x:\s*\[1,\s*(\d+)", spec_text).group(1))
    x = patches("camera" if "camera" in spec_text else "coins", size, 1 / 255)
    np.save(work / "x.npy", x)
    segmentation = "mask" in spec_text
    if segmentation:
        np.save(work / "mask.npy", patches("coins-mask", size, 1.0))
    spec_text = re.sub(r"\n\s*data\s+mask:[^\n]*", '\n    data mask: npy("mask.npy")', spec_text)
    spec_text = re.sub(r"\n\s*data\s+patches[^\n]*", '\n    data npy("x.npy")', spec_text)
    spec_text = re.sub(r"\n\s*noise\s+[^\n]*", "", spec_text)
    for field, value in [("batch", BATCH), ("validation", 0), ("seed", SEED)]:
        spec_text = re.sub(rf"\n(\s*){field}\s+[^\n]*", rf"\n\g<1>{field} {value}", spec_text)
    adam = re.search(r"optimizer\s+([^\n]*)", spec_text).group(1)

    _, init = train(spec_text, "sgd(lr: 1e-30)", 1, work, "init")
    (sgd_loss,), after_sgd = train(spec_text, "sgd(lr: 1)", 1, work, "sgd")
    losses, after = train(spec_text, adam, STEPS, work, "adam")
    # The state before any step: the running statistics as PyTorch starts them.
    for k in init:
        if k.endswith("running_mean") or k.endswith("num_batches_tracked"):
            init[k] = torch.zeros_like(init[k])
        elif k.endswith("running_var"):
            init[k] = torch.ones_like(init[k])

    (work / "model.py").write_text(aec("compile", work / "init.ae", "--emit", "torch"))
    loader = importlib.util.spec_from_file_location(f"m_{name}", work / "model.py")
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    model = mod.Model()
    model.load_state_dict(init, strict=True)
    model.train()
    xt = torch.from_numpy(x)
    target = torch.from_numpy(np.load(work / "mask.npy")) if segmentation else xt

    def loss_of(recon):
        return F.binary_cross_entropy(recon, target) if segmentation else F.mse_loss(recon, target)

    worst = {}
    opt = torch.optim.Adam(model.parameters(), **adam_args(adam))
    theirs = []
    for step in range(STEPS):
        opt.zero_grad()
        recon, _ = model(xt)
        loss = loss_of(recon)
        loss.backward()
        if step == 0:
            g_err = 0.0
            for k, p in model.named_parameters():
                ours = init[k] - after_sgd[k]
                g_err = max(g_err, ((ours - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-6)).item())
            worst["first loss"] = abs(loss.item() - sgd_loss) / abs(sgd_loss)
            worst["gradients (relative to each tensor's largest)"] = g_err
        opt.step()
        theirs.append(loss.item())
    worst["losses of the Adam steps"] = max(abs(a - b) / abs(b) for a, b in zip(losses, theirs))
    state = model.state_dict()
    stats = [k for k in state if "running" in k or "num_batches" in k]
    worst["parameters after the Adam steps"] = max(
        (after[k] - state[k]).abs().max().item() for k in state if k not in stats
    )
    worst["running statistics"] = max(
        ((after[k] - state[k].float()).abs().max() / state[k].float().abs().max().clamp(min=1e-6)).item() for k in stats
    )

    model.load_state_dict(after, strict=True)
    model.eval()
    aec("run", work / "adam.ae", "--weights", work / "adam" / "checkpoint.safetensors", "--input", work / "x.npy",
        "--raw-input", "--output", work / "y.npy")
    with torch.no_grad():
        recon, _ = model(xt)
    worst["evaluation output"] = np.abs(np.load(work / "y.npy") - recon.numpy()).max()
    # The other way: PyTorch's own state_dict (its batch counts int64) read by aec.
    ours_in_torch = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    save_file(ours_in_torch, str(work / "torch.safetensors"))
    aec("run", work / "adam.ae", "--weights", work / "torch.safetensors", "--input", work / "x.npy",
        "--raw-input", "--output", work / "y_torch.npy")
    worst["torch's state_dict run by aec"] = np.abs(np.load(work / "y_torch.npy") - recon.numpy()).max()
    ok = all(v < 1e-4 for v in worst.values())
    print(f"{name:13} " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + ("  ok" if ok else "  MISMATCH"))
    return ok


def adam_args(text):
    args = dict(re.findall(r"(\w+):\s*([\d.e-]+)", text))
    return {
        "lr": float(args.get("lr", 1e-3)),
        "betas": (float(args.get("b1", 0.9)), float(args.get("b2", 0.999))),
        "eps": float(args.get("eps", 1e-8)),
    }


def main():
    if not AEC.exists():
        raise SystemExit("build the release binary first: cargo build --release")
    torch.set_num_threads(1)
    names = sys.argv[1:] or DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for n in names:
            work = Path(tmp) / n
            work.mkdir()
            results.append(check(n, work))
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
