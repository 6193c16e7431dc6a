#!/usr/bin/env python3
"""Checks aec's conditional VAE (`condition y: token[10]`, joined with `concat y`) against a
hand-written PyTorch twin.

aec trains `specs/cvae_digits.ae` one step on one digit and its label (three digits, one at a
time: a batch of one, so that aec's shuffling cannot change which ε a sample gets), from the
same initial parameters, three times: SGD with lr 1e-30 (the loss), SGD with lr 1 (the
gradients) and the spec's Adam. PyTorch computes the same step with a CVAE written out here
(Sohn et al. 2015): the one-hot label concatenated to the flattened pixels before the
encoder's first dense layer and to the code before the decoder's, the code mu + exp(logvar/2)·ε
with aec's ε (the counter-based draws of step 1), and the summed BCE plus the summed KL. Loss,
gradients and the parameters after one Adam step must agree to 1e-5; the module `--emit
torch` writes must give the twin's reconstruction, and its `decode(z, y)` the twin's decoder.

    ../torch-venv/bin/python tests/torch/check_cvae.py

Needs the release binary (`cargo build --release`). Not part of `cargo test`: CI has no torch.
"""

import importlib.util
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from check_vae import AEC, ROOT, adam_args, aec, normal, verdict

BATCH, SEED = 1, 1
SAMPLES = [0, 13, 27]


def twin(p, x, y, eps):
    """The CVAE of `specs/cvae_digits.ae`, written out; (reconstruction, mu, logvar)."""
    onehot = F.one_hot(y.long(), 10).to(x.dtype)
    h = torch.relu(F.linear(torch.cat([x.flatten(1), onehot], 1), p["encoder.2.weight"], p["encoder.2.bias"]))
    mu = F.linear(h, p["encoder.3.mu.weight"], p["encoder.3.mu.bias"])
    logvar = F.linear(h, p["encoder.3.logvar.weight"], p["encoder.3.logvar.bias"])
    z = mu + torch.exp(0.5 * logvar) * eps
    return decoder(p, z, onehot), mu, logvar


def decoder(p, z, onehot):
    h = torch.relu(F.linear(torch.cat([z, onehot], 1), p["decoder.1.weight"], p["decoder.1.bias"]))
    return torch.sigmoid(F.linear(h, p["decoder.2.weight"], p["decoder.2.bias"])).reshape(-1, 8, 8)


def loss_of(p, x, y, eps):
    recon, mu, logvar = twin(p, x, y, eps)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return F.binary_cross_entropy(recon, x, reduction="sum") + kl


def main():
    if not AEC.exists():
        raise SystemExit("build the release binary first: cargo build --release")
    results = [check(k) for k in SAMPLES]
    sys.exit(0 if all(results) else 1)


def check(k):
    spec = (ROOT / "specs" / "cvae_digits.ae").read_text()
    x = np.load(ROOT / "specs" / "data" / "digits-images.npy")[k : k + BATCH].astype(np.float32) / 16.0
    y = np.load(ROOT / "specs" / "data" / "digits-labels.npy")[k : k + BATCH].astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.save(work / "x.npy", x)
        np.save(work / "y.npy", y)
        spec = spec.replace('npy("data/digits-images.npy", scale: 1/16)', 'npy("x.npy")')
        spec = spec.replace('npy("data/digits-labels.npy")', 'npy("y.npy")')
        for field, value in [("batch", BATCH), ("epochs", 1), ("validation", 0), ("seed", SEED)]:
            spec = re.sub(rf"\n(\s*){field}\s+[^\n]*", rf"\n\g<1>{field} {value}", spec)
        adam = re.search(r"optimizer\s+([^\n]*)", spec).group(1)

        def step(optimizer, tag):
            (work / f"{tag}.ae").write_text(re.sub(r"optimizer\s+[^\n]*", f"optimizer {optimizer}", spec))
            aec("run", "--train", work / f"{tag}.ae", "--out", work / tag)
            line = json.loads((work / tag / "metrics.jsonl").read_text().splitlines()[-1])
            return line["train_loss"], load_file(work / tag / "checkpoint.safetensors")

        loss_init, init = step("sgd(lr: 1e-30)", "init")
        loss_sgd, after_sgd = step("sgd(lr: 1)", "sgd")
        loss_adam, after_adam = step(adam, "adam")
        (work / "model.py").write_text(aec("compile", work / "init.ae", "--emit", "torch"))
        module_spec = importlib.util.spec_from_file_location("cvae", work / "model.py")
        mod = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(mod)

    # Step 1, salt 1 (the graph's first random op), element b·8 + j.
    eps = torch.tensor([[normal(SEED, 1, 1, b * 8 + j) for j in range(8)] for b in range(BATCH)])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    # float64: the loss and the reference gradients.
    p64 = {k: v.double().requires_grad_() for k, v in init.items()}
    loss64 = loss_of(p64, xt.double(), yt, eps.double())
    loss64.backward()
    grads = {k: v.grad.float() for k, v in p64.items()}
    # float32: one Adam step.
    p32 = {k: v.clone().requires_grad_() for k, v in init.items()}
    opt = torch.optim.Adam(list(p32.values()), **adam_args(adam))
    loss_of(p32, xt, yt, eps).backward()
    opt.step()
    state = {k: v.detach() for k, v in p32.items()}
    # The emitted module, in evaluation (the code is mu), against the twin with ε = 0.
    model = mod.Model()
    model.load_state_dict(init, strict=True)
    model.eval()
    with torch.no_grad():
        want, mu, _ = twin(init, xt, yt, torch.zeros(BATCH, 8))
        got, code = model(xt, yt)
        decoded = model.decode(mu, yt)
    worst = {
        "loss": abs(loss64.item() - loss_init) / abs(loss64.item()),
        "loss (sgd, adam runs)": max(abs(loss_sgd - loss_init), abs(loss_adam - loss_init)) / abs(loss_init),
        "emitted forward": (got - want).abs().max().item(),
        "emitted decode": (decoded - want).abs().max().item(),
    }
    head = f"cvae_digits digit {k:2} (a {y[0]})  loss {loss64.item():.4f} aec {loss_init:.4f}"
    return verdict(head, worst, grads, init, (after_sgd, after_adam), state)


if __name__ == "__main__":
    main()
