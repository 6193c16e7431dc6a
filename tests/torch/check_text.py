#!/usr/bin/env python3
"""Text models in aec against their PyTorch twins — without attention, with Luong's `dot` and
`general` attention and with Bahdanau's `additive` score (the `Attention` module `--emit torch` writes, padding masked with
`masked_fill(-inf)`), the encoder reading the padded source as packed sequences
(`pack_padded_sequence`): `CrossEntropyLoss(ignore_index=0)` over padded sentences, teacher
forcing; 15 steps of SGD with momentum (losses and parameters to 1e-5) and of Adam (losses to
1e-5, parameters to 3e-4: Adam divides each gradient by its own size, so the last-bit
differences of two libraries' sums in the many tiny gradients of rare words come out at the
learning rate's scale — up to 1.2e-4 of the largest weight here); and greedy decoding of the
SGD-trained model token for token against the twin's (`aec translate` against `model(src)`).

48 real pairs from specs/data/eng-spa/eng-spa.tsv, one batch of all of them per epoch (so both
see the same data in the same order); aec's run gives the ids (its `vocab.json`, with the
sentences tokenized here the way aec documents: lowercase, punctuation split off) and the
initial parameters (a run at SGD lr 1e-30 keeps them); PyTorch takes the same steps with the
module `aec compile --emit torch` writes.

    cargo build --release && ../torch-venv/bin/python tests/torch/check_text.py
"""

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
AEC = ROOT / "target" / "release" / "aec"
STEPS, LR, N = 15, 0.01, 48


def aec(*args):
    return subprocess.run([str(AEC), *map(str, args)], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def tokens(s):
    out = []
    for w in s.lower().split():
        out += re.findall(r"[^\W_]+(?:'[^\W_]+)*|[^\w\s]|_", w)
    return out


SPEC = """model t {{
    input  src: seq[<= 16] of token[300]
    target tgt: seq[<= 18] of token[300]
    encoder {{ embed 16; gru 32 }}
    decoder {{ gru 32 teacher_forcing; {attention} dense 300 -> softmax }}
    loss cross_entropy(tgt)
}}
train {{
    data text("{data}", tokens: word)
    batch {n}
    epochs {epochs}
    optimizer {opt}
    seed 5
}}
"""


def main():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lines = (ROOT / "specs/data/eng-spa/eng-spa.tsv").read_text().splitlines()[:N]
        (work / "pairs.tsv").write_text("\n".join(lines) + "\n")

        ok = True
        for attention in ["", "attention dot;", "attention general;", "attention additive;"]:
            ok &= check(work, lines, attention)
    sys.exit(0 if ok else 1)


def check(work, lines, attention):
        def run(tag, opt, epochs):
            tag = f"{tag}{len(attention)}"
            spec = work / f"{tag}.ae"
            spec.write_text(SPEC.format(data=work / "pairs.tsv", n=N, epochs=epochs, opt=opt, attention=attention))
            aec("run", "--train", spec, "--out", work / tag)
            losses = [json.loads(l)["train_loss"] for l in (work / tag / "metrics.jsonl").read_text().splitlines()]
            return spec, losses, load_file(work / tag / "checkpoint.safetensors")

        spec, _, init = run("init", "sgd(lr: 1e-30)", 1)
        vocab = json.loads((work / f"init{len(attention)}" / "vocab.json").read_text())["columns"]
        index = [{t: i for i, t in enumerate(c["tokens"])} for c in vocab]

        def ids(col, sentence, length):
            v = [index[col].get(t, 1) for t in tokens(sentence)] + [3]
            return v + [0] * (length - len(v))

        pairs = [l.split("\t") for l in lines]
        src = torch.tensor([ids(0, a, 16) for a, _ in pairs])
        tgt = torch.tensor([ids(1, b, 18) for _, b in pairs])
        (work / "m.py").write_text(aec("compile", spec, "--emit", "torch"))
        loader = importlib.util.spec_from_file_location("m", work / "m.py")
        mod = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(mod)
        pads = (tgt == 0).float().mean().item()
        ok = True
        name = attention.rstrip(";") or "no attention"
        for tag, opt_text, make, tol in [
            ("sgd", "sgd(lr: 0.5, momentum: 0.9)", lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9), 1e-5),
            ("adam", f"adam(lr: {LR})", lambda ps: torch.optim.Adam(ps, lr=LR), 3e-4),
        ]:
            _, ours, after = run(tag, opt_text, STEPS)
            model = mod.Model()
            model.load_state_dict(init, strict=True)
            opt = make(model.parameters())
            theirs = []
            for _ in range(STEPS):
                opt.zero_grad()
                probs, _ = model(src, tgt)
                loss = F.nll_loss(torch.log(probs).transpose(1, 2), tgt.long(), ignore_index=0)
                loss.backward()
                opt.step()
                theirs.append(loss.item())
            loss_err = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
            param_err = max((after[k] - v).abs().max().item() / v.abs().max().item() for k, v in model.state_dict().items())
            print(f"{name}: ({pads:.0%} of target positions padding), {STEPS} {tag} steps: losses {loss_err:.1e}, parameters {param_err:.1e}")
            ok &= loss_err < 1e-5 and param_err < tol
        # Greedy decoding of the SGD-trained model: aec's against the twin's, token for token.
        model = mod.Model().eval()
        model.load_state_dict(load_file(work / f"sgd{len(attention)}" / "checkpoint.safetensors"), strict=True)
        with torch.no_grad():
            ids, _ = model(src)
        target_vocab = vocab[1]["tokens"]

        def words(row):
            out = []
            for i in row.tolist():
                if i == 3:
                    break
                out.append(target_vocab[i])
            return out

        theirs = [words(r) for r in ids]
        spec = work / f"sgd{len(attention)}.ae"
        out = aec("translate", spec, "--weights", work / f"sgd{len(attention)}" / "checkpoint.safetensors", *[a for a, _ in pairs])
        ours = [tokens(l) for l in out.splitlines()]
        same = sum(a == b for a, b in zip(ours, theirs))
        print(f"{name}: greedy decoding of {len(pairs)} sentences, {same} the same as PyTorch's")
        return ok and same == len(pairs)


if __name__ == "__main__":
    main()
