#!/usr/bin/env python3
"""Training controls in aec against PyTorch: learning-rate schedules, ReduceLROnPlateau,
gradient clipping and RMSprop.

1. Every schedule's learning rate at every step (`aec compile --emit schedule`) against
   `torch.optim.lr_scheduler` of the same name stepped the way aec documents (once per epoch;
   OneCycleLR once per step), over a few hundred steps, to 1e-7 relative.
2. `plateau`: a run with a validation split; PyTorch's ReduceLROnPlateau is fed the run's own
   validation losses (metrics.jsonl) and must give the rate of each epoch.
3. Whole training runs of 8-3-8 (one full batch per epoch, so both see the same data): SGD with
   momentum under a step schedule and `clip norm`, RMSprop (centered, with momentum) under an
   exponential schedule and `clip value`, AdamW under onecycle and `clip norm`. PyTorch starts
   from aec's initial parameters and takes the same steps with `clip_grad_norm_` /
   `clip_grad_value_`; losses and parameters must agree to 1e-6 (relative).

    cargo build --release && ../torch-venv/bin/python tests/torch/check_schedules.py
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
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
AEC = ROOT / "target" / "release" / "aec"
sched = torch.optim.lr_scheduler


def aec(*args):
    return subprocess.run([str(AEC), *map(str, args)], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def spec(train_extra, optimizer="sgd(lr: 0.1)", epochs=40, validation=None):
    text = (ROOT / "specs" / "onehot838.ae").read_text()
    text = re.sub(r"optimizer\s+[^\n]*", f"optimizer {optimizer}", text)
    text = re.sub(r"\n(\s*)epochs\s+[^\n]*", rf"\n\g<1>epochs {epochs}", text)
    extra = "\n".join(f"    {line}" for line in train_extra)
    if validation:
        extra += f"\n    validation {validation}"
    return text.replace("    seed      7\n", f"    seed      7\n{extra}\n")


def aec_rates(work, tag, text, steps):
    path = work / f"{tag}.ae"
    path.write_text(text)
    rows = aec("compile", path, "--emit", "schedule", "--steps-per-epoch", steps).splitlines()[2:]
    return [float(r.split("\t")[2]) for r in rows]


def torch_rates(make, epochs, steps, per_step, base=0.1):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    s = make(opt)
    out = []
    for _ in range(epochs):
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            if per_step:
                s.step()
        if not per_step:
            s.step()
    return out


def rel_err(ours, theirs, base):
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    return max(abs(a - b) / max(abs(b), 1e-9 * base) for a, b in zip(ours, theirs))


def check_schedules(work):
    E, S = 40, 7  # 280 steps
    cases = [
        ("step(every: 7, gamma: 0.5)", lambda o: sched.StepLR(o, 7, 0.5), False),
        ("multistep(at: [5, 12, 30], gamma: 0.3)", lambda o: sched.MultiStepLR(o, [5, 12, 30], 0.3), False),
        ("exponential(gamma: 0.93)", lambda o: sched.ExponentialLR(o, 0.93), False),
        ("cosine(t_max: 15, min_lr: 1e-3)", lambda o: sched.CosineAnnealingLR(o, 15, 1e-3), False),
        (
            "cosine(t_max: 30, min_lr: 0, warmup: 5)",
            lambda o: sched.SequentialLR(
                o, [sched.LinearLR(o, 1 / 6, 1.0, 5), sched.CosineAnnealingLR(o, 30, 0.0)], [5]
            ),
            False,
        ),
        ("onecycle(max_lr: 0.4)", lambda o: sched.OneCycleLR(o, 0.4, total_steps=E * S, cycle_momentum=False), True),
        (
            "onecycle(max_lr: 1, pct_start: 0.45, div_factor: 10, final_div_factor: 100)",
            lambda o: sched.OneCycleLR(
                o, 1.0, total_steps=E * S, pct_start=0.45, div_factor=10, final_div_factor=100, cycle_momentum=False
            ),
            True,
        ),
    ]
    ok = True
    for i, (text, make, per_step) in enumerate(cases):
        ours = aec_rates(work, f"s{i}", spec([f"schedule {text}"], epochs=E), S)
        theirs = torch_rates(make, E, S, per_step)
        err = rel_err(ours, theirs, 0.1)
        print(f"  {text:<80} {len(ours)} steps: {err:.1e}")
        ok &= err < 1e-7
    return ok


def check_plateau(work):
    # 32 one-hot rows, a quarter held out for validation.
    data = work / "x.npy"
    np.save(data, np.tile(np.eye(8, dtype=np.float32), (4, 1)))
    text = spec(["schedule plateau(factor: 0.5, patience: 2, min_lr: 1e-3, cooldown: 1)"], "adam(lr: 0.05)", 60, 0.25)
    path = work / "plateau.ae"
    path.write_text(text.replace("onehot(8)", f'npy("{data}")'))
    aec("run", "--train", path, "--out", work / "plateau")
    rows = [json.loads(l) for l in (work / "plateau" / "metrics.jsonl").read_text().splitlines()]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=0.05)
    s = sched.ReduceLROnPlateau(opt, factor=0.5, patience=2, min_lr=1e-3, cooldown=1)
    theirs = []
    for r in rows:
        theirs.append(opt.param_groups[0]["lr"])
        s.step(r["val_loss"])
    ours = [r["lr"] for r in rows]
    err = rel_err(ours, theirs, 0.05)
    moves = len(set(theirs))
    print(f"  plateau over {len(rows)} epochs ({moves} rates): {err:.1e}")
    return err < 1e-7 and moves > 2


def load_module(work, path):
    (work / "m.py").write_text(aec("compile", path, "--emit", "torch"))
    loader = importlib.util.spec_from_file_location("m", work / "m.py")
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    return mod.Model()


def check_training(work, tag, optimizer, extra, make_opt, make_sched, per_step, clip, epochs=30):
    init_spec = work / f"{tag}-init.ae"
    init_spec.write_text(spec([], "sgd(lr: 1e-30)", 1))
    aec("run", "--train", init_spec, "--out", work / f"{tag}-init")
    init = load_file(work / f"{tag}-init" / "checkpoint.safetensors")
    path = work / f"{tag}.ae"
    path.write_text(spec(extra, optimizer, epochs))
    aec("run", "--train", path, "--out", work / tag)
    ours = [json.loads(l)["train_loss"] for l in (work / tag / "metrics.jsonl").read_text().splitlines()]
    after = load_file(work / tag / "checkpoint.safetensors")
    model = load_module(work, init_spec)
    model.load_state_dict(init, strict=True)
    opt = make_opt(model.parameters())
    s = make_sched(opt)
    x = torch.eye(8)
    theirs = []
    for _ in range(epochs):
        opt.zero_grad()
        recon, _ = model(x)
        l2 = sum((p**2).sum() for n, p in model.named_parameters() if n.endswith("weight"))
        loss = torch.nn.functional.binary_cross_entropy(recon, x) + 1e-4 * l2
        loss.backward()
        clip(list(model.parameters()))
        opt.step()
        s.step()
        theirs.append(loss.item())
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    param_err = max((after[k] - v).abs().max().item() / v.abs().max().item() for k, v in model.state_dict().items())
    print(f"  {tag:<8} {epochs} steps: losses {loss_err:.1e}, parameters {param_err:.1e}")
    return loss_err < 1e-6 and param_err < 1e-6


def main():
    torch.set_num_threads(1)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("learning rate of every step against torch.optim.lr_scheduler:")
        ok &= check_schedules(work)
        print("ReduceLROnPlateau on the run's validation losses:")
        ok &= check_plateau(work)
        print("training with schedules and clipping:")
        ok &= check_training(
            work,
            "sgd",
            "sgd(lr: 0.5, momentum: 0.9)",
            ["schedule step(every: 10, gamma: 0.5)", "clip norm(0.05)"],
            lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9),
            lambda o: sched.StepLR(o, 10, 0.5),
            False,
            lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.05),
        )
        ok &= check_training(
            work,
            "rmsprop",
            "rmsprop(lr: 0.01, momentum: 0.5, centered: true, weight_decay: 0.01)",
            ["schedule exponential(gamma: 0.95)", "clip value(0.02)"],
            lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True, weight_decay=0.01),
            lambda o: sched.ExponentialLR(o, 0.95),
            False,
            lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.02),
        )
        ok &= check_training(
            work,
            "rmsprop0",
            "rmsprop(lr: 0.01)",
            [],
            lambda ps: torch.optim.RMSprop(ps, lr=0.01),
            lambda o: sched.LambdaLR(o, lambda e: 1.0),
            False,
            lambda ps: None,
        )
        ok &= check_training(
            work,
            "adamw",
            "adamw(lr: 0.01, weight_decay: 0.1)",
            ["schedule onecycle(max_lr: 0.2)", "clip norm(0.1)"],
            lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
            lambda o: sched.OneCycleLR(o, 0.2, total_steps=30, cycle_momentum=False),
            True,
            lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.1),
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
