#!/usr/bin/env python3
"""Runs aec's ONNX exports in onnxruntime and compares them with aec itself.

For each spec: train it briefly (`aec run --train --epochs 1`), export the whole model, the
encoder and (where it can run alone) the decoder with `aec export`, and compare onnxruntime's
outputs with `aec run` (reconstruction) and `aec encode` (code) on the same inputs, at batch
1 and 13, to 1e-5. The decoder is fed the codes `aec encode` wrote. A teacher-forced decoder's
step is looped in Python: greedy decoding and beam search (width 3) against `aec run`'s ids. Extra specs written here
cover what the shipped ones do not: max pools with odd sizes and ties (windows of equal
values), overlapping pools, and GRU, LSTM and RNN encoders and decoders.

    ../torch-venv/bin/python tests/onnx/check_onnx.py [SPEC ...]

Needs the release binary (`cargo build --release`) and onnxruntime. Not part of `cargo test`.
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
AEC = ROOT / "target" / "release" / "aec"
SHIPPED = sorted(p.stem for p in (ROOT / "specs").glob("*.ae"))

# Specs only this check needs (written to a temporary folder; data-less, so trained on random
# inputs of their shape — `aec run --train` needs data, so these get a `random` data line).
EXTRA = {
    "links_nearest": """
model links_nearest {
    input x: [2, 7, 5]
    encoder { conv 3 k3 p1 nobias; batchnorm -> relu as e; upsample 2x3 nearest; avgpool 2x3; conv 3 k1 }
    decoder { add e; concat e; conv 2 k1 -> sigmoid }
    loss mse(x)
}
train { data random(count: 64); epochs 1; batch 16 }
""",
    "features_bn": """
model features_bn {
    input x: [12]
    encoder { dense 6 nobias; batchnorm(momentum: 0.3, eps: 1e-3) -> tanh as h; dense 4 }
    decoder { dense 6 nobias; add h; batchnorm -> relu; dense 12 -> sigmoid }
    loss mse(x)
}
train { data random(count: 64); epochs 1; batch 16 }
""",
    "ties_odd": """
model ties_odd {
    input x: [2, 7, 9]
    encoder { conv 3 k3 p1 -> relu; maxpool 2 as p; conv 4 k3x1 p1x0 -> tanh; maxpool 3 s2 as q }
    decoder { unpool q; deconv 3 k3x1 p1x0 -> relu; unpool p; deconv 2 k3 p1 -> sigmoid }
    loss mse(x)
}
train { data random(count: 64); epochs 1; batch 16 }
""",
    "gru_seq": """
model gru_seq {
    input s: seq[7] of token[5]
    encoder { embed 6; gru 9 }
    decoder { gru 9 seq; dense 5 -> softmax }
    loss cross_entropy(s)
}
train { data copy(len: 7, vocab: 5, count: 64); epochs 1; batch 16 }
""",
    "lstm_seq": """
model lstm_seq {
    input s: seq[6] of token[4]
    encoder { embed 5; lstm 7 seq; lstm 3 }
    decoder { lstm 7 seq; dense 4 -> softmax }
    loss cross_entropy(s)
}
train { data copy(len: 6, vocab: 4, count: 64); epochs 1; batch 16 }
""",
    "lstm_forced": """
model lstm_forced {
    input s: seq[6] of token[5]
    encoder { embed 4; lstm 7 }
    decoder { lstm 7 teacher_forcing; dense 5 -> softmax }
    loss cross_entropy(s)
}
train { data copy(len: 6, vocab: 5, count: 64); epochs 1; batch 16 }
""",
    "rnn_seq": """
model rnn_seq {
    input s: seq[5] of token[6]
    encoder { embed 4; rnn 8 nobias }
    decoder { rnn 8 seq; dense 6 -> softmax }
    loss cross_entropy(s)
}
train { data copy(len: 5, vocab: 6, count: 64); epochs 1; batch 16 }
""",
}


def aec(*args, check=True):
    r = subprocess.run([str(AEC), *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"aec {' '.join(map(str, args))}: {r.stderr.strip()}")
    return r


def input_info(spec):
    """(dims, token vocabulary or None) of the spec's input, from the layer table."""
    for line in aec("compile", spec).stdout.splitlines():
        if line.startswith("input "):
            text = line.split(None, 2)[2]
            if "token[" in text:
                length = int(text[text.index("seq[") + 4 : text.index("]")])
                vocab = int(text[text.index("token[") + 6 : text.index("]", text.index("token["))])
                return [length], vocab
            dims = text[text.index("[") + 1 : text.index("]")]
            return [int(d) for d in dims.split(",")], None
    raise SystemExit(f"{spec}: no input row")


def inputs(spec, batch, rng, ties):
    dims, vocab = input_info(spec)
    if vocab is not None and "seq[<=" in Path(spec).read_text():
        # Padded sentences (`seq[<= N]`): words (ids from 4: not the specials), the end token,
        # then padding (id 0) to the length.
        x = np.zeros([batch, *dims], dtype=np.int64)
        for row in x:
            n = rng.integers(1, dims[0] + 1)
            row[: n - 1] = rng.integers(4, vocab, size=n - 1)
            row[n - 1] = 3
        return x
    if vocab is not None:
        return rng.integers(0, vocab, size=[batch, *dims]).astype(np.int64)
    x = rng.random([batch, *dims], dtype=np.float32)
    if ties:
        x = np.round(x * 3) / 3  # few distinct values: pool windows with equal maxima
    return x


def conditions(spec, batch, rng):
    """A conditioned model's condition values ({name: array}): random classes or vectors."""
    out = {}
    for name, vocab, width in re.findall(r"condition\s+(\w+):\s*(?:token\[(\d+)\]|\[(\d+)\])", Path(spec).read_text()):
        if vocab:
            out[name] = rng.integers(0, int(vocab), size=[batch]).astype(np.int64)
        else:
            out[name] = rng.random([batch, int(width)], dtype=np.float32)
    return out


def close(what, a, b):
    err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    ok = a.shape == b.shape and err <= 1e-5
    return ok, (what, err if a.shape == b.shape else float("inf"))


def summary(results):
    """The largest difference of each kind over both batch sizes, and the notes."""
    worst, notes = {}, []
    for r in results:
        if isinstance(r, str):
            notes.append(r)
        else:
            worst[r[0]] = max(worst.get(r[0], 0.0), r[1])
    text = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    return ", ".join([text, *dict.fromkeys(notes)]) if notes else text


def check_seq2seq(spec, work, weights, vocab):
    """A teacher-forced model: the encoder (code and state) and one decoder step, looped as
    `aec run` decodes greedily (the start token is the vocabulary size; the next input is the
    argmax), against `aec run`'s token ids and `aec encode`'s codes."""
    sessions = {}
    for part in ["encoder", "step"]:
        out = work / f"{part}.onnx"
        aec("export", spec, "--weights", weights, "--onnx", out, "--part", part)
        sessions[part] = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    results, ok = [], True
    for batch in [1, 13]:
        x = inputs(spec, batch, rng, ties=False)  # batch 1 and 13 alike
        np.save(work / "x.npy", x.astype(np.int32))
        aec("run", spec, "--weights", weights, "--input", work / "x.npy", "--output", work / "y.npy")
        aec("encode", spec, "--weights", weights, "--input", work / "x.npy", "--output", work / "z.npy")
        y, z = np.load(work / "y.npy"), np.load(work / "z.npy")
        enc_out = [o.name for o in sessions["encoder"].get_outputs()]
        results_enc = sessions["encoder"].run(enc_out, {sessions["encoder"].get_inputs()[0].name: x})
        named = dict(zip(enc_out, results_enc))
        code, state = named["code"], named["state"]
        # Attention: the step also reads the encoder's states and the source (for its padding).
        extra = {}
        step_inputs = [i.name for i in sessions["step"].get_inputs()]
        if "memory" in step_inputs:
            extra["memory"] = named["memory"]
        if "source" in step_inputs:
            extra["source"] = x
        good, text = close("code", code, z)
        ok &= good
        results.append(text)
        prev = np.full([batch, 1], vocab, dtype=np.int64)
        ids = []
        for _ in range(y.shape[1]):
            out, state = sessions["step"].run(["recon", "state_after"], {"prev": prev, "state": state, **extra})
            prev = out[:, 0].argmax(-1)[:, None].astype(np.int64)
            ids.append(prev[:, 0])
        got = np.stack(ids, 1)
        if "seq[<=" in Path(spec).read_text():
            # Padded sentences end at their end token (id 3); aec pads after it.
            for row in got:
                ends = np.flatnonzero(row == 3)
                if ends.size:
                    row[ends[0] + 1 :] = 0
        same = bool(np.array_equal(got, y))
        ok &= same
        results.append(f"greedy ids {'equal' if same else 'DIFFER'} (batch {batch})")
        # Beam search (width 3, GNMT's length penalty α = 0.6) over the ONNX step against
        # `aec run --beam 3`.
        aec("run", spec, "--weights", weights, "--input", work / "x.npy", "--output", work / "b.npy", "--beam", 3)
        want = np.load(work / "b.npy")
        got = beam_search(sessions["step"], named, x, extra, vocab, want.shape[1], spec)
        same = bool(np.array_equal(got, want))
        ok &= same
        results.append(f"beam-3 ids {'equal' if same else 'DIFFER'} (batch {batch})")
    return ok, results


def beam_search(step, named, x, extra, vocab, length, spec, k=3, alpha=0.6):
    """aec's beam search (`runtime/decode.rs`) over the ONNX step: each sentence's k live
    hypotheses extended by every token, the best k kept (ties: the lower hypothesis, then the
    lower token), a hypothesis ending at the end token (id 3, padded targets) finished with its
    score divided by ((5 + |Y|) / 6)^α; at the end the best finished one (or live, if fewer
    than k finished)."""
    text = Path(spec).read_text()
    padded = "seq[<=" in text
    logits = not re.search(r"decoder\s*\{[^}]*->\s*softmax\s*\}", text)
    batch = x.shape[0]
    rep = lambda a: np.repeat(a, k, axis=0)
    state = rep(named["state"])
    extra = {name: rep(v) for name, v in extra.items()}
    penalty = lambda n: ((5 + n) / 6) ** alpha
    live = [[(0.0 if j == 0 else -np.inf, []) for j in range(k)] for _ in range(batch)]
    finished = [[] for _ in range(batch)]
    prev = np.full([batch * k, 1], vocab, dtype=np.int64)
    for _ in range(length):
        if all(len(f) >= k for f in finished):
            break
        out, after = step.run(["recon", "state_after"], {"prev": prev, "state": state, **extra})
        rows = out[:, 0].astype(np.float64)
        if logits:
            m = rows.max(-1, keepdims=True)
            rows = rows - (m + np.log(np.exp(rows - m).sum(-1, keepdims=True)))
        else:
            rows = np.log(np.maximum(rows, np.finfo(np.float32).tiny))
        new_state = np.zeros_like(after)
        for i in range(batch):
            if len(finished[i]) >= k:
                continue
            scores = np.array([live[i][j][0] for j in range(k)])[:, None] + rows[i * k : (i + 1) * k]
            j_of, v_of = np.meshgrid(np.arange(k), np.arange(vocab), indexing="ij")
            real = np.isfinite(np.array([live[i][j][0] for j in range(k)]))[:, None].repeat(vocab, 1)
            order = np.lexsort((v_of[real], j_of[real], -scores[real]))
            kept = []
            for c in order:
                if len(kept) >= k or len(finished[i]) >= k:
                    break
                score, j, v = scores[real][c], j_of[real][c], v_of[real][c]
                tokens = live[i][j][1] + [int(v)]
                if padded and v == 3:
                    finished[i].append((score / penalty(len(tokens)), tokens))
                else:
                    kept.append((score, tokens, j))
            kept += [(-np.inf, [], 0)] * (k - len(kept))
            for slot, (score, tokens, parent) in enumerate(kept):
                new_state[i * k + slot] = after[i * k + parent]
                prev[i * k + slot, 0] = tokens[-1] if tokens else vocab
                live[i][slot] = (score, tokens)
        state = new_state
    ids = np.zeros([batch, length], dtype=np.int32)
    for i in range(batch):
        every = list(finished[i])
        if len(every) < k:
            every += [(sc / penalty(len(tk)), tk) for sc, tk in live[i] if np.isfinite(sc)]
        best = None
        for c in every:
            if best is None or c[0] > best[0]:
                best = c
        if best is not None:
            ids[i, : len(best[1][:length])] = best[1][:length]
    return ids


def target_vocab(spec):
    """The vocabulary of the loss's target, from the layer table (`target` or `input` row)."""
    rows = [l for l in aec("compile", spec).stdout.splitlines() if l.startswith(("input ", "target "))]
    text = rows[-1]
    return int(text[text.index("token[") + 6 : text.index("]", text.index("token["))])


def check(name, spec, work):
    run = work / "run"
    aec("run", "--train", spec, "--epochs", "1", "--out", run)
    weights = run / "checkpoint.safetensors"
    if "teacher_forcing" in Path(spec).read_text():
        return check_seq2seq(spec, work, weights, target_vocab(spec))
    sessions = {}
    for part in ["model", "encoder", "decoder"]:
        out = work / f"{part}.onnx"
        r = aec("export", spec, "--weights", weights, "--onnx", out, "--part", part, check=False)
        if r.returncode == 0:
            sessions[part] = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        elif part == "model":
            return False, [f"export failed: {r.stderr.strip()}"]
        else:
            sessions[part] = r.stderr.strip().splitlines()[-1]
    rng = np.random.default_rng(3)
    results, ok = [], True
    for batch in [1, 13]:
        x = inputs(spec, batch, rng, ties=name == "ties_odd")
        np.save(work / "x.npy", x.astype(np.int32) if x.dtype == np.int64 else x)
        # A conditioned model: its conditions beside the input, to aec and to every session.
        given = conditions(spec, batch, rng)
        flags = []
        for c, values in given.items():
            np.save(work / f"condition_{c}.npy", values.astype(np.int32) if values.dtype == np.int64 else values)
            flags += ["--condition", work / f"condition_{c}.npy"]
        aec("run", spec, "--weights", weights, "--input", work / "x.npy", "--raw-input", "--output", work / "y.npy", *flags)
        # A quantized code: `aec encode` writes its ids, `--vectors` its codebook vectors.
        quantized = "quantize" in Path(spec).read_text()
        vectors = ["--vectors"] if quantized else []
        aec("encode", spec, "--weights", weights, "--input", work / "x.npy", "--raw-input", "--output", work / "z.npy", *vectors, *flags)
        y, z = np.load(work / "y.npy"), np.load(work / "z.npy")
        feed = {sessions["model"].get_inputs()[0].name: x, **given}
        recon, code = sessions["model"].run(["recon", "code"], feed)[:2]
        for what, a, b in [("recon", recon, y), ("code", code, z)]:
            good, text = close(what, a, b)
            ok &= good
            results.append(text)
        if quantized:
            aec("encode", spec, "--weights", weights, "--input", work / "x.npy", "--raw-input", "--output", work / "ids.npy")
            ids = sessions["encoder"].run(["code_ids"], feed)[0]
            same = np.array_equal(ids, np.load(work / "ids.npy"))
            ok &= same
            results.append(f"code_ids {'equal' if same else 'DIFFER'}")
        enc = sessions["encoder"].run(["code"], feed)[0]
        good, text = close("encoder", enc, z)
        ok &= good
        results.append(text)
        if isinstance(sessions["decoder"], str):
            results.append("no decoder alone (it reads the encoder: unpools or links)")
        else:
            dec = sessions["decoder"].run(["recon"], {"code": z, **given})[0]
            good, text = close("decoder", dec, y)
            ok &= good
            results.append(text)
    return ok, results


def main():
    if not AEC.exists():
        raise SystemExit("build the release binary first: cargo build --release")
    names = sys.argv[1:] or SHIPPED + list(EXTRA)
    all_ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            if name in EXTRA:
                spec = work / f"{name}.ae"
                spec.write_text(EXTRA[name])
            else:
                spec = ROOT / "specs" / f"{name}.ae"
                text = spec.read_text()
                if "\ntrain" not in text:
                    # A spec without data (a worked example): random data of its inputs' shapes.
                    names = re.findall(r"(?:input|target)\s+(\w+)\s*:", text)
                    lines = "".join(f"    data {n}: random(count: 32)\n" for n in names)
                    spec = work / f"{name}.ae"
                    spec.write_text(text + f"\ntrain {{\n{lines}    epochs 1\n    batch 8\n}}\n")
            try:
                ok, results = check(name, spec, work)
            except RuntimeError as e:
                if "has no parameters" in str(e) or "nothing to train" in str(e):
                    print(f"{name:15} skipped: {str(e).splitlines()[-1][:120]}")
                    continue
                ok, results = False, [str(e).splitlines()[-1]]
            all_ok &= ok
            print(f"{name:15} {'ok      ' if ok else 'MISMATCH'} {summary(results)}")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
