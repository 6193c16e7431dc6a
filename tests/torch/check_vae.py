#!/usr/bin/env python3
"""Checks aec's VAE against the PyTorch module `aec compile --emit torch` writes, with the same ε.

The training batch is eight copies of one digit, so which row of the batch draws which ε does
not matter; ε itself is aec's counter-based draw (`interp::normal`), recomputed here from the
seed and step. For each VAE spec, three one-step aec runs from the same initial parameters:
SGD with lr 1e-30 (the parameters stay the initial ones), SGD with lr 1 (the parameters move by
minus the gradient) and the spec's Adam. PyTorch computes the loss and gradients from the same
initial parameters and ε, and takes one Adam step. All must agree to 1e-5.

    ../torch-venv/bin/python tests/torch/check_vae.py [SPEC ...]

Needs the release binary (`cargo build --release`). Not part of `cargo test`: CI has no torch.
"""

import importlib.util
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
AEC = ROOT / "target" / "release" / "aec"
DEFAULT = ["vae_digits", "vae_conv", "beta_vae"]
M64 = (1 << 64) - 1
SEED, BATCH = 1, 8


def uniform(seed, step, salt, i):
    """aec's `interp::uniform`: a counter-based draw in [0, 1)."""
    z = seed ^ ((step * 0x9E3779B97F4A7C15) & M64) ^ (salt << 48) ^ ((i * 0xD1B54A32D192ED03) & M64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return float(np.float32(z >> 40) / np.float32(1 << 24))


def normal(seed, step, salt, i):
    """aec's `interp::normal`: Box–Muller over draws 2i and 2i + 1, in f64, rounded to f32."""
    u1 = 1.0 - uniform(seed, step, salt, 2 * i)
    u2 = uniform(seed, step, salt, 2 * i + 1)
    return float(np.float32(math.sqrt(-2.0 * math.log(u1)) * math.cos(math.tau * u2)))


def aec(*args):
    return subprocess.run([str(AEC), *map(str, args)], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def one_step(spec_text, optimizer, work, tag):
    """Trains one step of `spec_text` with `optimizer`; (loss, parameters after)."""
    text = re.sub(r"optimizer\s+[^\n]*", f"optimizer {optimizer}", spec_text)
    path = work / f"{tag}.ae"
    path.write_text(text)
    run = work / tag
    aec("run", "--train", path, "--out", run)
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return line["train_loss"], load_file(run / "checkpoint.safetensors")


def three_steps(name, spec_text, x, fields, work):
    """`spec_text` on the samples `x` (one epoch, one batch of all of them, no validation, and
    `fields` replaced), trained one step three times from the same initial parameters: SGD with
    lr 1e-30, SGD with lr 1 and the spec's Adam. Returns the spec as run, Adam's arguments,
    (initial parameters, (loss, parameters after) of each run) and the module `--emit torch`
    writes for it."""
    np.save(work / "x.npy", x)
    spec_text = re.sub(r"data\s+npy\([^\n]*", 'data npy("x.npy")', spec_text)
    for field, value in [("batch", len(x)), ("epochs", 1), ("validation", 0), *fields]:
        spec_text = re.sub(rf"\n(\s*){field}\s+[^\n]*", rf"\n\g<1>{field} {value}", spec_text)
    adam = re.search(r"optimizer\s+([^\n]*)", spec_text).group(1)
    _, init = one_step(spec_text, "sgd(lr: 1e-30)", work, "init")
    sgd = one_step(spec_text, "sgd(lr: 1)", work, "sgd")
    adam_run = one_step(spec_text, adam, work, "adam")
    (work / "model.py").write_text(aec("compile", work / "init.ae", "--emit", "torch"))
    mod_spec = importlib.util.spec_from_file_location(f"m_{name}", work / "model.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return spec_text, adam, (init, sgd, adam_run), mod


def check(name, work):
    spec_text = (ROOT / "specs" / f"{name}.ae").read_text()
    digit = np.load(ROOT / "specs" / "data" / "digits-images.npy")[7].astype(np.float32) / 16.0
    spec_text, adam, (init, (loss_sgd, after_sgd), (loss_adam, after_adam)), mod = three_steps(
        name, spec_text, np.repeat(digit[None], BATCH, 0), [("seed", SEED)], work
    )
    model = mod.Model()
    model.load_state_dict(init, strict=True)
    model.train()
    gaussian = next(m for m in model.encoder if isinstance(m, mod.Gaussian))
    n = gaussian.mu.out_features
    # Step 1, salt 1 (the first random op of the graph), element b·N + j.
    gaussian.eps = torch.tensor([[normal(SEED, 1, 1, b * n + j) for j in range(n)] for b in range(BATCH)])

    x = torch.from_numpy(np.repeat(digit[None, None], BATCH, 0))
    recon, _ = model(x)
    terms = re.search(r"loss\s+([^\n]*)", spec_text).group(1)
    loss = torch_loss(terms, recon, x, gaussian)
    model.zero_grad()
    loss.backward()
    worst = {"loss": abs(loss.item() - loss_sgd) / abs(loss_sgd), "loss (adam run)": abs(loss_adam - loss_sgd) / abs(loss_sgd)}
    opt = torch.optim.Adam(model.parameters(), **adam_args(adam))
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    state = model.state_dict()
    return verdict(f"{name:12} loss {loss.item():.6f} aec {loss_sgd:.6f}", worst, grads, init, (after_sgd, after_adam), state)


def verdict(head, worst, grads, init, aec_after, state):
    """Adds to `worst` how far aec's gradients (initial minus after SGD at lr 1) are from
    PyTorch's `grads`, and aec's parameters after one Adam step from PyTorch's `state`; prints
    the line; true when every difference is under 1e-5."""
    after_sgd, after_adam = aec_after
    grad_err, adam_err = 0.0, 0.0
    for k, g in grads.items():
        aec_grad = init[k] - after_sgd[k]
        grad_err = max(grad_err, ((aec_grad - g).abs().max() / g.abs().max().clamp(min=1e-6)).item())
        adam_err = max(adam_err, (after_adam[k] - state[k]).abs().max().item())
    worst["gradients (relative to each tensor's largest)"] = grad_err
    worst["parameters after one Adam step"] = adam_err
    ok = all(v < 1e-5 for v in worst.values())
    print(f"{head}; " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + ("  ok" if ok else "  MISMATCH"))
    return ok


def torch_loss(terms, recon, x, gaussian):
    """The spec's loss line in PyTorch: `bce(x, reduction: R)` and `W * kl(code[, reduction: R])`."""
    total = 0.0
    for term in re.split(r"\s\+\s", terms):
        m = re.match(r"(?:([\d.e-]+)\s*\*\s*)?(\w+)\((\w+)(?:,\s*reduction:\s*(\w+))?\)", term.strip())
        weight, kind, _, reduction = m.groups()
        weight = float(weight or 1.0)
        if kind == "kl":
            total = total + weight * gaussian.kl(reduction or "batchmean")
        elif kind == "bce":
            s = F.binary_cross_entropy(recon, x, reduction="sum")
            total = total + weight * {"sum": s, "mean": s / x.numel(), "batchmean": s / x.shape[0]}[reduction or "mean"]
        else:
            raise SystemExit(f"no PyTorch twin for `{term}` in this check")
    return total


def adam_args(text):
    args = dict(re.findall(r"(\w+):\s*([\d.e-]+)", text))
    out = {"lr": float(args.get("lr", 1e-3))}
    out["betas"] = (float(args.get("b1", 0.9)), float(args.get("b2", 0.999)))
    out["eps"] = float(args.get("eps", 1e-8))
    return out


def run_all(default, check):
    """Runs `check(name, work)` for each spec named on the command line (else `default`), each
    in a folder of its own; exits 1 if one disagrees."""
    if not AEC.exists():
        raise SystemExit("build the release binary first: cargo build --release")
    names = sys.argv[1:] or default
    torch.set_default_dtype(torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for n in names:
            work = Path(tmp) / n
            work.mkdir()
            results.append(check(n, work))
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    run_all(DEFAULT, check)
