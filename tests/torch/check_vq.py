#!/usr/bin/env python3
"""Checks aec's quantized code (`quantize K`) and `vq(code, beta: β)` against hand-written
PyTorch.

aec trains one step on a batch of eight different digits from the same initial parameters three
times: SGD with lr 1e-30 (the loss at the initial parameters), SGD with lr 1 (the parameters
move by minus the gradient) and the spec's Adam. PyTorch runs the module `aec compile --emit
torch` writes, with its quantizer's output replaced by a hand-written one (van den Oord et al.
2017, §3.2):

    ids  = argmin_k ‖z_p − e_k‖²  at each position p   (z's channels at p, an image code)
    z_q  = e_ids
    code = z + (z_q − z).detach()                       (the straight-through gradient)
    loss = mse(recon, x) + λ·(mse(z_q, z.detach()) + β·mse(z, z_q.detach()))

The ids must be the module's own, the emitted `penalties(code)` the hand-written VQ loss, and
loss, gradients (the codebook's from its loss, the encoder's straight through the lookup) and
the parameters after one Adam step must agree to 1e-5 (the gradients read from an SGD step of
lr 1000, since the decoder's first weights see codebook vectors of about 1/K). The loss and the gradients are compared
in float64 on the PyTorch side (aec computes in float32). Besides the shipped conv spec, a
dense one checks a vector code, and a third the moving-average codebook: its buffers after the
step (counts, sums and the codebook) against the hand-written averages, in aec and in the
emitted module.

    ../torch-venv/bin/python tests/torch/check_vq.py [SPEC ...]

Needs the release binary (`cargo build --release`). Not part of `cargo test`: CI has no torch.
"""

import re

import numpy as np
import torch
import torch.nn.functional as F

import json

from safetensors.torch import load_file, save_file

from check_vae import ROOT, adam_args, aec, run_all, three_steps, verdict

BATCH = 8

# A vector code: the quantizer replaces the whole 6-wide code.
DENSE = """model vq_dense {
    input x: [8, 8]
    encoder {
        flatten
        dense 32 -> relu
        dense 6
        quantize 16
    }
    decoder {
        dense 64 -> sigmoid
        reshape [8, 8]
    }
    loss mse(x) + 0.5 * vq(code, beta: 0.4)
}

train {
    data       npy("data/digits-images.npy", scale: 1/16)
    batch      64
    epochs     1
    optimizer  adam(lr: 1e-2)
    seed       3
}
"""

# The same with a moving-average codebook (no codebook loss; the step moves it itself).
EMA = DENSE.replace("vq_dense", "vq_ema").replace("quantize 16", "quantize(ema: 0.9) 16")


def hand_quantize(z, codebook):
    """The nearest codebook vector of each of z's vectors (channels at each position)."""
    rows = z.flatten(2).transpose(1, 2) if z.dim() > 2 else z[:, None, :]
    dist = ((rows[:, :, None, :] - codebook[None, None]) ** 2).sum(-1)
    ids = dist.argmin(-1)
    picked = codebook[ids]
    zq = picked.transpose(1, 2).reshape(z.shape) if z.dim() > 2 else picked[:, 0]
    return zq, ids if z.dim() > 2 else ids[:, 0]


def hand_ema(init, prefix, rows, ids, decay):
    """The moving averages after one step (count, sum) and the codebook they give: the
    smoothed count (c + ε)/(Σc + Kε)·Σc, ε = 1e-5, and each entry the sum over it."""
    count, sums = init[prefix + "ema_count"].double(), init[prefix + "ema_sum"].double()
    size, width = sums.shape
    flat = ids.flatten()
    picked = torch.bincount(flat, minlength=size).double()
    batch = torch.zeros(size, width, dtype=torch.float64).index_add_(0, flat, rows.reshape(-1, width).double())
    count = count - (1 - decay) * (count - picked)
    sums = sums - (1 - decay) * (sums - batch)
    n = count.sum()
    smoothed = (count + 1e-5) / (n + size * 1e-5) * n
    return {"ema_count": count, "ema_sum": sums, "codebook": sums / smoothed[:, None]}


def check(name, work):
    spec_text = {"vq_dense": DENSE, "vq_ema": EMA}.get(name) or (ROOT / "specs" / f"{name}.ae").read_text()
    digits = np.load(ROOT / "specs" / "data" / "digits-images.npy")[:BATCH].astype(np.float32) / 16.0
    if "[1, 8, 8]" in spec_text:
        digits = digits[:, None]
    spec_text, adam, (first, _, _), mod = three_steps(name, spec_text, digits, [], work)
    # A step moves a moving-average codebook whatever the learning rate, so the runs start from
    # a saved state (`--init`): the parameters after a step of lr 1e-30, the averages at zero.
    init = {k: torch.zeros_like(v) if "ema_" in k else v for k, v in first.items()}
    save_file(init, str(work / "start.safetensors"))

    def step(optimizer, tag):
        text = re.sub(r"optimizer\s+[^\n]*", f"optimizer {optimizer}", spec_text)
        (work / f"{tag}.ae").write_text(text)
        aec("run", "--train", work / f"{tag}.ae", "--out", work / tag, "--init", work / "start.safetensors")
        line = json.loads((work / tag / "metrics.jsonl").read_text().splitlines()[-1])
        return line["train_loss"], load_file(work / tag / "checkpoint.safetensors")

    loss_sgd, _ = step("sgd(lr: 1e-30)", "at_init")
    loss_adam, after_adam = step(adam, "adam_init")
    # The decoder's first weights see codebook vectors of about 1/K: their gradients are small
    # beside the weights, so an SGD step of lr 1 would leave them under float32's resolution.
    # A step of lr 1000 measures them; `verdict` reads it as the step of lr 1 it stands for.
    _, after = step("sgd(lr: 1000)", "sgd1000")
    after_sgd = {k: init[k].double() - (init[k].double() - after[k].double()) / 1000 for k in init}
    terms = re.search(r"loss\s+([^\n]*)", spec_text).group(1)
    m = re.search(r"(?:([\d.e-]+)\s*\*\s*)?vq\(code(?:,\s*beta:\s*([\d.e-]+))?\)", terms)
    weight, beta = float(m.group(1) or 1.0), float(m.group(2) or 0.25)
    ema = re.search(r"quantize\(ema:\s*([\d.e-]+)\)", spec_text)
    ids_match = [True]

    def loss_of(model, x):
        quantizer = next(q for q in model.encoder if isinstance(q, mod.Quantize))
        seen = {}

        # The codebook as it was (an EMA module replaces it in its forward).
        before = quantizer.codebook.detach().clone() if ema else quantizer.codebook

        def replace(module, inputs, output):
            z = inputs[0]
            zq, ids = hand_quantize(z, before)
            seen.update(z=z, zq=zq, ids=ids)
            ids_match[0] = ids_match[0] and torch.equal(ids, module.ids)
            return z + (zq - z).detach()

        hook = quantizer.register_forward_hook(replace)
        recon, code = model(x)
        hook.remove()
        z, zq = seen["z"], seen["zq"]
        vq = beta * F.mse_loss(z, zq.detach())
        if not ema:
            vq = vq + F.mse_loss(zq, z.detach())
        model.seen = seen
        return F.mse_loss(recon, x) + weight * vq, vq, code

    x = torch.from_numpy(digits)
    # float64: the reference gradients.
    ref = mod.Model().double()
    ref.load_state_dict({k: v.double() for k, v in init.items()}, strict=True)
    ref.train()
    loss64, vq64, code = loss_of(ref, x.double())
    emitted = ref.penalties(code)
    ref.zero_grad()
    loss64.backward()
    grads = {k: p.grad.float() for k, p in ref.named_parameters()}
    # float32: one Adam step, as aec takes it.
    model = mod.Model()
    model.load_state_dict(init, strict=True)
    model.train()
    opt = torch.optim.Adam(model.parameters(), **adam_args(adam))
    loss, _, _ = loss_of(model, x)
    model.zero_grad()
    loss.backward()
    opt.step()
    worst = {
        "emitted vq": abs(emitted.item() - weight * vq64.item()) / abs(weight * vq64.item()),
        "loss": abs(loss64.item() - loss_sgd) / abs(loss64.item()),
        "loss (adam run)": abs(loss_adam - loss_sgd) / abs(loss_sgd),
        "ids differ": 0.0 if ids_match[0] else 1.0,
    }
    if ema:
        # The buffers after the step: the hand-written averages against aec's and against the
        # emitted module's own update in its forward.
        index = next(i for i, q in enumerate(ref.encoder) if isinstance(q, mod.Quantize))
        prefix = f"encoder.{index}."
        seen = ref.seen
        rows = seen["z"].flatten(2).transpose(1, 2) if seen["z"].dim() > 2 else seen["z"][:, None, :]
        want = hand_ema(init, prefix, rows.detach(), seen["ids"], float(ema.group(1)))
        for key, value in want.items():
            scale = value.abs().max().clamp(min=1e-6)
            worst[f"{key} (aec)"] = ((after_adam[prefix + key].double() - value).abs().max() / scale).item()
            worst[f"{key} (module)"] = ((getattr(ref.encoder[index], key) - value).abs().max() / scale).item()
    head = f"{name:14} loss {loss64.item():.6f} aec {loss_sgd:.6f}"
    return verdict(head, worst, grads, init, (after_sgd, after_adam), model.state_dict())


if __name__ == "__main__":
    run_all(["vqvae_digits", "vq_dense", "vq_ema"], check)
