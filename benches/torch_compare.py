#!/usr/bin/env python3
"""Training throughput of aec's native code against PyTorch eager and JAX, in one run.

For each bench spec: `aec bench SPEC --batch B --json` for aec, then the same network in PyTorch
(the module `aec compile --emit torch` writes, so shapes and layers are the same) and in JAX
(the same dense layers, or the GRU autoencoder with or without attention, with optax's Adam
or SGD), the same batch, loss,
optimizer and thread count, timed the same way (median of 5 rounds, after warm-up). JAX is timed
two ways: one `jax.jit` step per call, and a `lax.scan` of 50 steps per call (its fastest form).
Each figure is the median of R such measurements taken in turns with the others (--repeat).
Prints one line per spec: every rate, and aec against the best peer. bench_conv28 (max-pool
switches and unpooling) has no JAX twin here: its column says `-`. bench_unet's JAX twin is
written by hand (`unet_jax`); it is timed as jit steps only (see `jax_worker`).

    --threads N   aec, PyTorch and XLA on N threads (default: all cores). Pin a one-thread run
                  with `taskset -c 0`.
    --repeat R    rounds per spec (default 3): each round times every framework once, in turn,
                  and each column is the median of its rounds.

Setup (outside the repository, not needed by CI):
    python3 -m venv ../torch-venv && ../torch-venv/bin/pip install torch numpy safetensors jax optax
    cargo build --release && ../torch-venv/bin/python benches/torch_compare.py [--threads 1] [SPEC…]
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
AEC = ROOT / "target" / "release" / "aec"

# spec, batch, optimizer (as the spec's train block: name, lr, momentum), loss
BENCHES = [
    ("onehot838", 8, ("sgd", 5.0, 0.9), "mse"),
    ("digits_mlp", 64, ("adam", 3e-3, 0.0), "mse"),
    ("bench_mlp784", 64, ("adam", 1e-3, 0.0), "mse"),
    ("bench_mlp784", 256, ("adam", 1e-3, 0.0), "mse"),
    ("bench_conv28", 64, ("adam", 1e-3, 0.0), "mse"),
    ("bench_gru", 32, ("adam", 1e-3, 0.0), "cross_entropy"),
    ("bench_attention", 32, ("adam", 1e-3, 0.0), "cross_entropy"),
    ("bench_unet", 64, ("adam", 1e-3, 0.0), "mse"),
]


def torch_opt(params, opt):
    name, lr, momentum = opt
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr)


class GruSeqAe(torch.nn.Module):
    """bench_gru written as one would in PyTorch: the same layers and shapes as the spec, the
    decoder teacher-forced on one-hot previous tokens, cross-entropy on the logits; with
    `attention`, bench_attention's Luong attention (general scores) after the decoder's GRU."""

    def __init__(self, vocab=16, embed=16, hidden=64, attention=False):
        super().__init__()
        self.vocab = vocab
        self.embed = torch.nn.Embedding(vocab, embed)
        self.enc = torch.nn.GRU(embed, hidden, batch_first=True)
        self.dec = torch.nn.GRU(vocab + 1, hidden, batch_first=True)
        self.attn = torch.nn.Linear(hidden, hidden, bias=False) if attention else None
        self.concat = torch.nn.Linear(2 * hidden, hidden) if attention else None
        self.out = torch.nn.Linear(hidden, vocab)

    def forward(self, x):
        memory, h = self.enc(self.embed(x))
        start = torch.full_like(x[:, :1], self.vocab)
        prev = torch.nn.functional.one_hot(torch.cat([start, x[:, :-1]], 1), self.vocab + 1).float()
        y, _ = self.dec(prev, h)
        if self.attn is not None:
            weights = torch.softmax(y @ self.attn(memory).transpose(1, 2), -1)
            y = torch.tanh(self.concat(torch.cat([weights @ memory, y], -1)))
        return self.out(y)


def aec(*args):
    return subprocess.run([str(AEC), *map(str, args)], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def torch_rate(name, batch, opt_spec, threads, tmp, loss_name):
    torch.set_num_threads(threads)
    if loss_name == "cross_entropy":
        model = GruSeqAe(attention=name == "bench_attention")
        opt = torch_opt(model.parameters(), opt_spec)
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
    opt = torch_opt(model.parameters(), opt_spec)
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


def dense_layers(name):
    """(fan_in, fan_out, activation) of each dense layer of a spec, from its PyTorch module; None
    when the spec has other layers."""
    text = aec("compile", ROOT / "specs" / f"{name}.ae", "--emit", "torch")
    layers = re.findall(r"nn\.Linear\((\d+), (\d+), bias=True\),\s+# \d+: dense \d+(?: -> (\w+))?", text)
    if not layers or re.search(r"nn\.(Conv|GRU|LSTM|RNN|Embedding)", text):
        return None
    return [(int(i), int(o), act or "linear") for i, o, act in layers]


def jax_worker(name, batch, threads, opt_spec, loss_name):
    """Runs in a child process (XLA reads its thread flags at import): prints JAX's samples/s
    for one jit step per call and for a lax.scan of 50 steps per call, as JSON."""
    if threads == 1:
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    import jax
    import jax.numpy as jnp
    import optax

    key = jax.random.PRNGKey(0)
    act = {"relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "linear": lambda v: v}
    if loss_name == "cross_entropy":
        vocab, embed, hidden, length = 16, 16, 64, 20

        def gru_params(k, fan_in):
            k1, k2 = jax.random.split(k)
            s = hidden**-0.5
            return {
                "wi": jax.random.uniform(k1, (fan_in, 3 * hidden), minval=-s, maxval=s),
                "wh": jax.random.uniform(k2, (hidden, 3 * hidden), minval=-s, maxval=s),
                "bi": jnp.zeros(3 * hidden),
                "bh": jnp.zeros(3 * hidden),
            }

        def gru(p, xs, h):
            xp = xs @ p["wi"] + p["bi"]  # [B, T, 3H], one matmul for every step

            def cell(h, x):
                hp = h @ p["wh"] + p["bh"]
                r = jax.nn.sigmoid(x[:, :hidden] + hp[:, :hidden])
                z = jax.nn.sigmoid(x[:, hidden : 2 * hidden] + hp[:, hidden : 2 * hidden])
                n = jnp.tanh(x[:, 2 * hidden :] + r * hp[:, 2 * hidden :])
                h = (1 - z) * n + z * h
                return h, h

            h, ys = jax.lax.scan(cell, h, jnp.swapaxes(xp, 0, 1))
            return h, jnp.swapaxes(ys, 0, 1)

        ks = jax.random.split(key, 7)
        s = hidden**-0.5
        params = {
            "embed": jax.random.normal(ks[0], (vocab, embed)),
            "enc": gru_params(ks[1], embed),
            "dec": gru_params(ks[2], vocab + 1),
            "out_w": jax.random.uniform(ks[3], (hidden, vocab), minval=-0.125, maxval=0.125),
            "out_b": jnp.zeros(vocab),
        }
        attends = name == "bench_attention"
        if attends:
            params["attn"] = jax.random.uniform(ks[5], (hidden, hidden), minval=-s, maxval=s)
            params["concat_w"] = jax.random.uniform(ks[6], (2 * hidden, hidden), minval=-s, maxval=s)
            params["concat_b"] = jnp.zeros(hidden)
        x = jax.random.randint(ks[4], (batch, length), 0, vocab)

        def loss_fn(p, x):
            h0 = jnp.zeros((x.shape[0], hidden))
            h, memory = gru(p["enc"], p["embed"][x], h0)
            prev = jnp.concatenate([jnp.full((x.shape[0], 1), vocab), x[:, :-1]], 1)
            _, ys = gru(p["dec"], jax.nn.one_hot(prev, vocab + 1), h)
            if attends:
                scores = jnp.einsum("bth,bsh->bts", ys, memory @ p["attn"])
                context = jnp.einsum("bts,bsh->bth", jax.nn.softmax(scores, -1), memory)
                ys = jnp.tanh(jnp.concatenate([context, ys], -1) @ p["concat_w"] + p["concat_b"])
            logits = ys @ p["out_w"] + p["out_b"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, x).mean()

    elif name == "bench_unet":
        params, loss_fn, x = unet_jax(key, batch)
    else:
        layers = dense_layers(name)
        params = []
        for i, (fi, fo, a) in enumerate(layers):
            k = jax.random.fold_in(key, i)
            s = fi**-0.5
            params.append((jax.random.uniform(k, (fi, fo), minval=-s, maxval=s), jnp.zeros(fo)))
        x = jax.random.uniform(key, (batch, layers[0][0]))

        def loss_fn(p, x):
            h = x
            for (w, b), (_, _, a) in zip(p, layers):
                h = act[a](h @ w + b)
            return jnp.mean((h - x) ** 2)

    opt_name, lr, momentum = opt_spec
    tx = optax.adam(lr) if opt_name == "adam" else optax.sgd(lr, momentum=momentum)
    state = tx.init(params)
    # bench_unet's batch norms keep running estimates, updated each step as PyTorch's are.
    running = [(jnp.zeros(b[0].shape), jnp.ones(b[0].shape)) for b in params["bn"]] if name == "bench_unet" else None

    def one(carry, _):
        p, s = carry[:2]
        if running is None:
            loss, g = jax.value_and_grad(loss_fn)(p, x)
        else:
            (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x)
            r = [(0.9 * rm + 0.1 * m, 0.9 * rv + 0.1 * v) for (rm, rv), (m, v) in zip(carry[2], stats)]
        u, s = tx.update(g, s, p)
        new = (optax.apply_updates(p, u), s)
        return (new if running is None else new + (r,)), loss

    step = jax.jit(lambda *c: one(c, None))
    scan_steps = 50
    many = jax.jit(lambda *c: jax.lax.scan(one, c, None, length=scan_steps))
    carry = (params, state) if running is None else (params, state, running)

    def jit_step():
        nonlocal carry
        carry, loss = step(*carry)
        loss.block_until_ready()

    def scan_call():
        nonlocal carry
        carry, losses = many(*carry)
        losses.block_until_ready()

    rates = {"jit": timed(jit_step, batch)}
    # XLA had not compiled bench_unet's 50-step scan after 19 minutes (2-core Zen 5): its
    # column says `-`.
    if name != "bench_unet":
        rates["scan"] = timed(scan_call, batch * scan_steps)
    print(json.dumps(rates))


def unet_jax(key, batch):
    """bench_unet in JAX as one would write it for XLA on a CPU: NHWC, `lax.conv_general_dilated`,
    batch norm from the batch's statistics with the running estimates updated in the step (as
    PyTorch's and Flax's do), a 2×2 max pool by `reduce_window`, nearest upsampling by
    `jnp.repeat`, the skip concatenated along channels."""
    import jax
    import jax.numpy as jnp

    convs = [(1, 16), (16, 32), (32, 64), (96, 32), (48, 16), (16, 1)]
    params = {"conv": [], "bn": []}
    for i, (ci, co) in enumerate(convs):
        s = (ci * 9) ** -0.5
        params["conv"].append(jax.random.uniform(jax.random.fold_in(key, i), (3, 3, ci, co), minval=-s, maxval=s))
        if i < 5:
            params["bn"].append((jnp.ones(co), jnp.zeros(co)))
    params["out_b"] = jnp.zeros(1)
    x = jax.random.uniform(key, (batch, 28, 28, 1))

    def conv(v, w):
        return jax.lax.conv_general_dilated(v, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def bn_relu(v, gb):
        mean = v.mean((0, 1, 2))
        var = v.var((0, 1, 2))
        y = (v - mean) / jnp.sqrt(var + 1e-5) * gb[0] + gb[1]
        return jax.nn.relu(y), (mean, v.var((0, 1, 2), ddof=1))

    def pool(v):
        return jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def up(v):
        return jnp.repeat(jnp.repeat(v, 2, 1), 2, 2)

    def loss_fn(p, x):
        c, b = p["conv"], p["bn"]
        e1, s1 = bn_relu(conv(x, c[0]), b[0])
        e2, s2 = bn_relu(conv(pool(e1), c[1]), b[1])
        h, s3 = bn_relu(conv(pool(e2), c[2]), b[2])
        h, s4 = bn_relu(conv(jnp.concatenate([up(h), e2], -1), c[3]), b[3])
        h, s5 = bn_relu(conv(jnp.concatenate([up(h), e1], -1), c[4]), b[4])
        y = jax.nn.sigmoid(conv(h, c[5]) + p["out_b"])
        return jnp.mean((y - x) ** 2), [s1, s2, s3, s4, s5]

    return params, loss_fn, x


def jax_rates(name, batch, threads, opt_spec, loss_name):
    if loss_name != "cross_entropy" and name != "bench_unet" and dense_layers(name) is None:
        return None
    args = [sys.executable, __file__, "--jax-worker", name, str(batch), str(threads), json.dumps([opt_spec, loss_name])]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    argv = sys.argv[1:]
    if argv[:1] == ["--jax-worker"]:
        name, batch, threads, rest = argv[1], int(argv[2]), int(argv[3]), json.loads(argv[4])
        return jax_worker(name, batch, threads, tuple(rest[0]), rest[1])
    threads_flag, repeat = [], 3
    while argv[:1] in (["--threads"], ["--repeat"]):
        if argv[0] == "--threads":
            threads_flag = ["--threads", argv[1]]
        else:
            repeat = int(argv[1])
        argv = argv[2:]
    only = argv
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(
            f"{'spec':14} {'batch':>5} {'threads':>7} {'aec':>10} {'torch':>9} {'jax jit':>9} {'jax scan':>9}"
            f" {'aec/best':>8}"
        )
        for name, batch, opt_spec, loss_name in BENCHES:
            if only and name not in only:
                continue
            # Every framework once per round, the rounds one after another: on a shared machine
            # each framework then sees the same spells of load, and each figure is a median.
            rounds = {"aec": [], "torch": [], "jit": [], "scan": []}
            for _ in range(repeat):
                ours = json.loads(
                    aec("bench", ROOT / "specs" / f"{name}.ae", "--batch", batch, "--json", *threads_flag)
                )
                threads = ours["threads"]
                rounds["aec"].append(ours["train_samples_per_s"])
                rounds["torch"].append(torch_rate(name, batch, opt_spec, threads, tmp, loss_name))
                jx = jax_rates(name, batch, threads, opt_spec, loss_name)
                for k, v in (jx or {}).items():
                    rounds[k].append(v)
            med = {k: sorted(v)[len(v) // 2] for k, v in rounds.items() if v}
            best = max(v for k, v in med.items() if k != "aec")
            j = " ".join(f"{med[k]:9.0f}" if k in med else f"{'-':>9}" for k in ("jit", "scan"))
            print(
                f"{name:14} {batch:5} {threads:7} {med['aec']:10.0f} {med['torch']:9.0f} {j}"
                f" {med['aec'] / best:7.2f}x",
                flush=True,
            )

if __name__ == "__main__":
    sys.exit(main())
