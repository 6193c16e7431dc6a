#!/usr/bin/env python3
"""Training throughput of aec's native code against PyTorch eager, in one run.

For each bench spec: `aec bench SPEC --batch B --json` for aec, then the same network in PyTorch
(the module `aec compile --emit torch` writes, so shapes and layers are the same), the same
batch, loss, optimizer and thread count, timed the same way (median of 5 rounds, after warm-up).
Prints one line per spec with both samples/s and the ratio.

Setup (outside the repository, not needed by CI):
    python3 -m venv ../torch-venv && ../torch-venv/bin/pip install torch numpy safetensors
    cargo build --release && ../torch-venv/bin/python benches/torch_compare.py
"""

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
AEC = ROOT / "target" / "release" / "aec"

# spec, batch, optimizer (as the spec's train block), loss
BENCHES = [
    ("onehot838", 8, lambda p: torch.optim.SGD(p, lr=5.0, momentum=0.9), "mse"),
    ("digits_mlp", 64, lambda p: torch.optim.Adam(p, lr=3e-3), "mse"),
    ("bench_mlp784", 64, lambda p: torch.optim.Adam(p, lr=1e-3), "mse"),
    ("bench_mlp784", 256, lambda p: torch.optim.Adam(p, lr=1e-3), "mse"),
    ("bench_conv28", 64, lambda p: torch.optim.Adam(p, lr=1e-3), "mse"),
    ("bench_gru", 32, lambda p: torch.optim.Adam(p, lr=1e-3), "cross_entropy"),
]


class GruSeqAe(torch.nn.Module):
    """bench_gru written as one would in PyTorch: the same layers and shapes as the spec, the
    decoder teacher-forced on one-hot previous tokens, cross-entropy on the logits."""

    def __init__(self, vocab=16, embed=16, hidden=64):
        super().__init__()
        self.vocab = vocab
        self.embed = torch.nn.Embedding(vocab, embed)
        self.enc = torch.nn.GRU(embed, hidden, batch_first=True)
        self.dec = torch.nn.GRU(vocab + 1, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, vocab)

    def forward(self, x):
        _, h = self.enc(self.embed(x))
        start = torch.full_like(x[:, :1], self.vocab)
        prev = torch.nn.functional.one_hot(torch.cat([start, x[:, :-1]], 1), self.vocab + 1).float()
        y, _ = self.dec(prev, h)
        return self.out(y)


def aec(*args):
    return subprocess.run([str(AEC), *map(str, args)], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def torch_rate(name, batch, make_opt, threads, tmp, loss_name):
    torch.set_num_threads(threads)
    if loss_name == "cross_entropy":
        model = GruSeqAe()
        opt = make_opt(model.parameters())
        x = torch.randint(0, model.vocab, (batch, 20))

        def step():
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, model.vocab), x.reshape(-1))
            loss.backward()
            opt.step()

        return timed(step, batch)
    path = tmp / f"{name}.py"
    path.write_text(aec("compile", ROOT / "specs" / f"{name}.ae", "--emit", "torch"))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.Model()
    opt = make_opt(model.parameters())
    shape = None
    for line in aec("compile", ROOT / "specs" / f"{name}.ae").splitlines():
        if line.startswith("input "):
            shape = [int(d) for d in line[line.index("[") + 1 : line.index("]")].split(",")]
    x = torch.rand([batch] + shape)

    def step():
        opt.zero_grad(set_to_none=True)
        recon, _ = model(x)
        loss = torch.nn.functional.mse_loss(recon, x)
        loss.backward()
        opt.step()

    return timed(step, batch)


def timed(step, batch):
    """Samples/s of `step`: the median of 5 rounds of ~0.3 s, after warm-up."""
    for _ in range(5):
        step()
    # Rounds long enough to time: aim at ~0.3 s each.
    t = time.perf_counter()
    step()
    one = max(time.perf_counter() - t, 1e-6)
    steps = max(3, min(5000, int(0.3 / one)))
    rates = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch / (time.perf_counter() - t))
    return sorted(rates)[2]


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{'spec':14} {'batch':>5} {'threads':>7} {'aec samples/s':>15} {'torch samples/s':>16} {'ratio':>7}")
        only = sys.argv[1:]
        for name, batch, make_opt, loss_name in BENCHES:
            if only and name not in only:
                continue
            ours = json.loads(aec("bench", ROOT / "specs" / f"{name}.ae", "--batch", batch, "--json"))
            threads = ours["threads"]
            theirs = torch_rate(name, batch, make_opt, threads, tmp, loss_name)
            a = ours["train_samples_per_s"]
            print(f"{name:14} {batch:5} {threads:7} {a:15.0f} {theirs:16.0f} {a / theirs:6.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
