#!/usr/bin/env python3
"""Checks aec's `sparsity(code, rho: ρ)` and `contractive(code)` against hand-written PyTorch.

For each spec, aec trains one step on a batch of eight different digits from the same initial
parameters three times: SGD with lr 1e-30 (the loss at the initial parameters), SGD with lr 1
(the parameters move by minus the gradient) and the spec's Adam. PyTorch runs the module
`aec compile --emit torch` writes and computes the penalties as the papers write them:

    sparsity:    Σⱼ ρ log(ρ / ρ̂ⱼ) + (1 − ρ) log((1 − ρ) / (1 − ρ̂ⱼ)),  ρ̂ = code.mean(0)  (Ng)
    contractive: mean over the batch of Σᵢ (hᵢ(1 − hᵢ))² Σⱼ Wᵢⱼ²  (Rifai et al. 2011; tanh: 1 − hᵢ²)

Loss, gradients and the parameters after one Adam step must agree to 1e-5. The loss and the
gradients are compared in float64 on the PyTorch side (aec computes in float32).

    ../torch-venv/bin/python tests/torch/check_penalties.py [SPEC ...]

Needs the release binary (`cargo build --release`). Not part of `cargo test`: CI has no torch.
"""

import re

import numpy as np
import torch
import torch.nn as nn

# The three one-step runs, the optimizer's arguments and the loop over specs, as the VAE check
# has them.
from check_vae import ROOT, adam_args, run_all, three_steps, verdict

DEFAULT = ["sparse_digits", "contractive_digits"]
BATCH = 8


def penalties(terms, x, recon, code, model):
    total = 0.0
    for term in re.split(r"\s\+\s", terms):
        m = re.match(r"(?:([\d.e-]+)\s*\*\s*)?(\w+)\((\w+)(.*)\)", term.strip())
        weight, kind, _, rest = m.groups()
        weight = float(weight or 1.0)
        args = dict(re.findall(r"(\w+):\s*([\w.e-]+)", rest))
        if kind == "mse":
            total = total + weight * ((recon - x) ** 2).mean()
        elif kind == "sparsity":
            rho = float(args.get("rho", 0.05))
            rate = code.mean(0)
            kl = rho * torch.log(rho / rate) + (1 - rho) * torch.log((1 - rho) / (1 - rate))
            total = total + weight * kl.sum()
        elif kind == "contractive":
            linear = next(m for m in model.encoder if isinstance(m, nn.Linear))
            slope = code * (1 - code) if args.get("act", "sigmoid") == "sigmoid" else 1 - code**2
            norm = (slope**2 * (linear.weight**2).sum(1)).sum()
            reduction = args.get("reduction", "batchmean")
            total = total + weight * {"sum": norm, "batchmean": norm / code.shape[0], "mean": norm / code.numel()}[reduction]
        else:
            raise SystemExit(f"no PyTorch twin for `{term}` in this check")
    return total


def check(name, work):
    spec_text = (ROOT / "specs" / f"{name}.ae").read_text()
    digits = np.load(ROOT / "specs" / "data" / "digits-images.npy")[:BATCH].astype(np.float32) / 16.0
    spec_text, adam, (init, (loss_sgd, after_sgd), (loss_adam, after_adam)), mod = three_steps(
        name, spec_text, digits, [], work
    )
    terms = re.search(r"loss\s+([^\n]*)", spec_text).group(1)
    if "tanh" in spec_text.split("encoder", 1)[1].split("}", 1)[0]:
        terms = terms.replace("contractive(code", "contractive(code, act: tanh")
    x = torch.from_numpy(digits)

    def loss_of(model):
        recon, code = model(x)
        return penalties(terms, x, recon, code, model)

    # float64: the reference gradients.
    ref = mod.Model().double()
    ref.load_state_dict({k: v.double() for k, v in init.items()}, strict=True)
    x = x.double()
    loss64 = loss_of(ref)
    ref.zero_grad()
    loss64.backward()
    grads = {k: p.grad.float() for k, p in ref.named_parameters()}
    # float32: one Adam step, as aec takes it.
    x = x.float()
    model = mod.Model()
    model.load_state_dict(init, strict=True)
    opt = torch.optim.Adam(model.parameters(), **adam_args(adam))
    loss = loss_of(model)
    model.zero_grad()
    loss.backward()
    opt.step()
    state = model.state_dict()
    # The module's own `penalties(code)` (what `--emit torch` writes) is the hand-written sum.
    with torch.no_grad():
        recon, code = ref(x.double())
        mine = penalties(re.sub(r"^[^+]*\+\s*", "", terms), x.double(), recon, code, ref)
        emitted = ref.penalties(code)
    x = x.float()
    worst = {
        "emitted penalties": abs(emitted.item() - mine.item()) / abs(mine.item()),
        "loss": abs(loss64.item() - loss_sgd) / abs(loss64.item()),
        "loss (adam run)": abs(loss_adam - loss_sgd) / abs(loss_sgd),
    }
    head = f"{name:20} loss {loss64.item():.6f} aec {loss_sgd:.6f}"
    return verdict(head, worst, grads, init, (after_sgd, after_adam), state)


if __name__ == "__main__":
    run_all(DEFAULT, check)
