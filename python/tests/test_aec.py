"""The Python package against the `aec` command: the same spec and seed give the same bits.

Run from the repository: `pytest python/tests`. The command is `$AEC_BIN`, else the one
`cargo build` or `cargo test` left in target/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import aec

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
DIGITS = SPECS / "digits_mlp.ae"


def aec_bin() -> str:
    if os.environ.get("AEC_BIN"):
        return os.environ["AEC_BIN"]
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "aec"
        if p.is_file():
            return str(p)
    pytest.skip("no aec binary: run `cargo build` first (or set AEC_BIN)")


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([aec_bin(), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fit_on_the_digits_is_the_command_line_run_bit_for_bit(tmp_path):
    m = aec.compile(str(DIGITS))
    hist = m.fit(epochs=4, out=tmp_path / "py", progress=False)
    cli("run", str(DIGITS), "--train", "--epochs", "4", "--out", str(tmp_path / "cli"))
    assert (tmp_path / "py" / "checkpoint.safetensors").read_bytes() == (
        tmp_path / "cli" / "checkpoint.safetensors"
    ).read_bytes()
    ran = metrics(tmp_path / "cli")
    assert hist["epoch"] == [1, 2, 3, 4]
    assert hist["train_loss"] == [r["train_loss"] for r in ran]
    assert hist["val_loss"] == [r["val_loss"] for r in ran]
    # And the parameters the model holds are the checkpoint's.
    again = aec.load(str(DIGITS), tmp_path / "cli")
    for name, value in m.params.items():
        assert np.array_equal(value, again.params[name]), name


def test_fit_on_arrays_equals_fit_on_the_spec_data(tmp_path):
    m = aec.compile(DIGITS)
    x = m.data()["x"]
    assert x.dtype == np.float32 and x.shape == (1797, 8, 8) and x.max() <= 1.0
    m.fit(epochs=2, out=tmp_path / "spec", progress=False)
    n = aec.compile(DIGITS)
    n.fit(x, epochs=2, out=tmp_path / "arrays", progress=False)
    assert (tmp_path / "spec" / "checkpoint.safetensors").read_bytes() == (
        tmp_path / "arrays" / "checkpoint.safetensors"
    ).read_bytes()


def test_a_second_fit_goes_on_from_the_trained_weights(tmp_path):
    m = aec.compile(DIGITS)
    first = m.fit(epochs=3, out=tmp_path / "a", progress=False)
    second = m.fit(epochs=3, out=tmp_path / "b", progress=False)
    assert second["train_loss"][0] < first["train_loss"][0]


def test_encode_and_reconstruct_equal_the_command_line(tmp_path):
    m = aec.compile(DIGITS)
    m.fit(epochs=2, out=tmp_path / "run", progress=False)
    x = m.data()["x"][:37]
    np.save(tmp_path / "x.npy", x)
    weights = str(tmp_path / "run" / "checkpoint.safetensors")
    cli("encode", str(DIGITS), "--weights", weights, "--input", str(tmp_path / "x.npy"),
        "--output", str(tmp_path / "z.npy"), "--raw-input")
    cli("run", str(DIGITS), "--weights", weights, "--input", str(tmp_path / "x.npy"),
        "--output", str(tmp_path / "y.npy"), "--raw-input")
    z = m.encode(x)
    assert z.dtype == np.float32 and z.flags.c_contiguous and z.shape == (37, 16)
    assert np.array_equal(z, np.load(tmp_path / "z.npy"))
    assert np.array_equal(m.reconstruct(x), np.load(tmp_path / "y.npy"))
    # Not contiguous: still right.
    assert np.array_equal(m.encode(np.asfortranarray(x)), z)
    # The interpreter agrees with the native code.
    assert np.allclose(m.encode(x, backend="interp"), z, atol=1e-5)


def test_a_vq_vae_encodes_ids_as_aec_encode_and_decodes_them(tmp_path):
    spec = SPECS / "vqvae_digits.ae"
    m = aec.compile(spec)
    assert m.quantized and not aec.compile(DIGITS).quantized
    history = m.fit(epochs=2, out=tmp_path / "run", progress=False)
    assert all(1 <= p <= 32 for p in history["codebook_perplexity"])
    x = m.data()["x"][:11]
    np.save(tmp_path / "x.npy", x)
    weights = str(tmp_path / "run" / "checkpoint.safetensors")
    cli("encode", str(spec), "--weights", weights, "--input", str(tmp_path / "x.npy"),
        "--output", str(tmp_path / "ids.npy"), "--raw-input")
    ids = m.encode(x)
    assert ids.dtype == np.int32 and ids.shape == (11, 4, 4)
    assert np.array_equal(ids, np.load(tmp_path / "ids.npy"))
    # The ids decode as the vectors they pick: the reconstruction itself.
    vectors = m.encode(x, vectors=True)
    assert vectors.shape == (11, 8, 4, 4)
    assert np.array_equal(m.decode(ids), m.decode(vectors))
    assert np.array_equal(m.decode(ids), m.reconstruct(x))
    with pytest.raises(ValueError, match="outside the codebook of 32"):
        m.decode(np.full((1, 4, 4), 32, dtype=np.int32))
    with pytest.raises(ValueError, match=r"\[n, 4, 4\]"):
        m.decode(np.zeros((1, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="no quantizer"):
        aec.compile(DIGITS).encode(x.reshape(11, 8, 8), vectors=True)


def test_a_conditional_vae_draws_the_class_asked_for_as_aec_sample_does(tmp_path):
    spec = SPECS / "cvae_digits.ae"
    m = aec.compile(spec)
    assert m.conditions == ["y"]
    m.fit(epochs=3, out=tmp_path / "run", progress=False)
    weights = str(tmp_path / "run" / "checkpoint.safetensors")
    cli("sample", str(spec), "--weights", weights, "--condition", "3", "--count", "5", "--seed", "2",
        "--output", str(tmp_path / "s.npy"))
    assert np.array_equal(m.sample(5, seed=2, condition=3), np.load(tmp_path / "s.npy"))
    data = m.data()
    x, y = data["x"][:9], data["y"][:9]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    cli("encode", str(spec), "--weights", weights, "--input", str(tmp_path / "x.npy"), "--raw-input",
        "--condition", str(tmp_path / "y.npy"), "--output", str(tmp_path / "z.npy"))
    z = m.encode(x, condition=y)
    assert np.array_equal(z, np.load(tmp_path / "z.npy"))
    assert np.array_equal(m.reconstruct(x, condition={"y": y}), m.decode(z, condition=y))
    # Training on arrays by name equals training on the spec's own data.
    again = aec.compile(spec)
    again.fit({"x": data["x"], "y": data["y"]}, epochs=3, out=tmp_path / "again", progress=False)
    assert np.array_equal(again.encode(x, condition=y), z)
    with pytest.raises(ValueError, match="conditioned on `y`"):
        m.encode(x)
    with pytest.raises(ValueError, match="outside"):
        m.sample(2, condition=10)
    with pytest.raises(ValueError, match="has none"):
        aec.compile(DIGITS).sample(2, gmm=2, condition=1)


def test_a_vae_samples_what_aec_sample_draws(tmp_path):
    spec = SPECS / "vae_digits.ae"
    m = aec.compile(spec)
    m.fit(epochs=1, out=tmp_path / "run", progress=False)
    cli("sample", str(spec), "--weights", str(tmp_path / "run" / "checkpoint.safetensors"),
        "--count", "5", "--seed", "7", "--output", str(tmp_path / "s.npy"))
    assert np.array_equal(m.sample(5, seed=7), np.load(tmp_path / "s.npy"))
    x = m.data()["x"]
    line = m.interpolate(x[0], x[1], steps=5)
    assert line.shape == (5,) + x.shape[1:]
    ends = m.reconstruct(x[:2])
    assert np.allclose(line[0], ends[0], atol=1e-6) and np.allclose(line[-1], ends[1], atol=1e-6)
    z = np.zeros((2,) + m.code_shape, np.float32)
    assert m.decode(z).shape == (2,) + x.shape[1:]


def test_save_and_load_give_the_same_model(tmp_path):
    m = aec.compile(DIGITS)
    m.fit(epochs=1, out=tmp_path / "run", progress=False)
    saved = m.save(tmp_path / "saved")
    assert saved.name == "checkpoint.safetensors" and (tmp_path / "saved" / "model.ae").is_file()
    again = aec.load(tmp_path / "saved" / "model.ae", tmp_path / "saved")
    x = m.data()["x"][:5]
    assert np.array_equal(m.encode(x), again.encode(x))


def test_summary_and_params():
    m = aec.compile(DIGITS)
    assert m.summary() == cli("compile", str(DIGITS)).stdout.split("native training step")[0]
    p = m.params
    assert p["encoder.1.weight"].shape == (48, 64) and p["encoder.1.weight"].dtype == np.float32
    assert sum(v.size for v in p.values()) == 7856


def test_spec_errors_are_exceptions_with_the_located_diagnostics():
    bad = "model a {\n    input x: [4]\n    encoder { dense 2 -> relx }\n    decoder mirror\n    loss mse(x)\n}\n"
    with pytest.raises(aec.SpecError) as e:
        aec.compile(bad)
    assert "unknown activation `relx`" in str(e.value) and "<string>:3:" in str(e.value)
    d = e.value.diagnostics[0]
    assert (d["line"], d["column"], d["help"]) == (3, 26, "did you mean `relu`?")
    assert isinstance(e.value, ValueError)
    # Every error of a file at once, as the command prints them.
    worse = bad.replace("dense 2", "dense 0").replace("mse(x)", "mse(y)")
    with pytest.raises(aec.SpecError) as e:
        aec.compile(worse)
    assert len([d for d in e.value.diagnostics if d["severity"] == "error"]) >= 3


def test_bad_arrays_are_type_and_value_errors():
    m = aec.compile(DIGITS)
    x = m.data()["x"]
    with pytest.raises(TypeError, match=r"\[n, 8, 8\] float32; got float64"):
        m.encode(x.astype(np.float64))
    with pytest.raises(TypeError, match="got str"):
        m.encode("digits")
    with pytest.raises(ValueError, match=r"declared \[8, 8\]"):
        m.encode(np.zeros((3, 7), np.float32))
    nan = x[:4].copy()
    nan[2, 3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        m.fit(nan, epochs=1, progress=False)
    with pytest.raises(ValueError, match="NaN or infinity"):
        m.encode(nan)
    with pytest.raises(ValueError, match="declares no target"):
        m.fit(x, x, epochs=1, progress=False)
    with pytest.raises(ValueError, match="learning rate"):
        m.fit(x, epochs=1, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        m.fit(x, epochs=0, progress=False)
    with pytest.raises(ValueError, match=r"\[n, 16\]"):
        m.decode(np.zeros((2, 15), np.float32))


def test_missing_files_are_os_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        aec.compile(tmp_path / "nowhere.ae")
    with pytest.raises(FileNotFoundError):
        aec.load(DIGITS, tmp_path / "no-run")
    m = aec.compile(DIGITS)
    with pytest.raises(OSError, match="nothing to resume"):
        m.fit(out=tmp_path / "empty", resume=True, progress=False)
    spec = tmp_path / "lost.ae"
    spec.write_text(DIGITS.read_text().replace("data/digits-images.npy", "data/missing.npy"))
    with pytest.raises(aec.SpecError, match="missing.npy"):
        aec.compile(spec).fit(epochs=1, out=tmp_path / "run", progress=False)


def test_the_gil_is_released_while_it_trains(tmp_path):
    m = aec.compile(DIGITS)
    ticks = []
    running = threading.Event()
    done = threading.Event()

    def count():
        while not done.is_set():
            if running.is_set():
                ticks.append(time.monotonic())
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    running.set()
    start = time.monotonic()
    m.fit(epochs=400, out=tmp_path / "run", progress=False)
    end = time.monotonic()
    done.set()
    t.join()
    inside = [s for s in ticks if start < s < end]
    # The thread ran all through the training, not only in its gaps: ticks in every tenth of it.
    assert end - start > 0.2
    tenths = {int(10 * (s - start) / (end - start)) for s in inside}
    assert len(tenths) >= 8, (len(inside), sorted(tenths), end - start)


def test_ctrl_c_leaves_a_run_that_resumes_to_the_same_bits(tmp_path):
    # Long enough that the first checkpoint (after 2 s of training) comes well before the end.
    # The child takes Ctrl-C as a terminal's Python does: a shell that starts the tests in the
    # background has SIGINT ignored, and Python keeps an ignored SIGINT ignored.
    run = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import aec, signal, sys, warnings
        signal.signal(signal.SIGINT, signal.default_int_handler)
        m = aec.compile({str(DIGITS)!r})
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            h = m.fit(epochs=30000, out={str(run)!r}, progress=False)
        print(len(h["epoch"]), w[0].message if w else "no warning")
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run / "checkpoint.safetensors").is_file():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    epochs, message = out.split(" ", 1)
    assert "training interrupted" in message and "resume=True" in message, out
    assert int(epochs) < 30000
    saved = json.loads((run / "save.json").read_text()) if (run / "save.json").exists() else None
    done = metrics(run)[-1]["epoch"]
    assert 1 <= done <= int(epochs), (done, epochs, saved)
    # Resumed to a few epochs further, it is the uninterrupted run at that epoch, bit for bit.
    m = aec.compile(DIGITS)
    m.fit(out=run, resume=True, epochs=30000, stop_at=done + 3, progress=False)
    straight = aec.compile(DIGITS)
    straight.fit(out=tmp_path / "straight", epochs=30000, stop_at=done + 3, progress=False)
    assert (run / "checkpoint.safetensors").read_bytes() == (tmp_path / "straight" / "checkpoint.safetensors").read_bytes()


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    m = aec.compile(DIGITS)
    m.fit(epochs=1, out=tmp_path / "run", progress=False)
    path = m.export_onnx(tmp_path / "encoder.onnx", part="encoder")
    x = m.data()["x"][:6]
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (z,) = s.run(None, {s.get_inputs()[0].name: x})
    assert np.allclose(z, m.encode(x), atol=1e-5)
    with pytest.raises(ValueError, match="part must be"):
        m.export_onnx(tmp_path / "x.onnx", part="middle")


def test_to_torch_gives_the_same_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    m = aec.compile(DIGITS)
    m.fit(epochs=1, out=tmp_path / "run", progress=False)
    module = m.to_torch()
    x = m.data()["x"][:6]
    with torch.no_grad():
        y = module(torch.from_numpy(x))
    y = y[0] if isinstance(y, tuple) else y
    assert np.allclose(y.numpy(), m.reconstruct(x), atol=1e-5)


def test_the_readme_example_prints_what_the_readme_shows(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    shown = section.split("\nprints", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    shutil.copytree(SPECS, tmp_path / "specs")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == shown


def test_any_autoencoder_samples_from_a_mixture_fitted_to_its_codes(tmp_path):
    m = aec.compile(DIGITS)
    m.fit(epochs=3, out=tmp_path / "run", progress=False)
    cli("sample", str(DIGITS), "--weights", str(tmp_path / "run" / "checkpoint.safetensors"), "--gmm", "3",
        "--count", "6", "--seed", "2", "--output", str(tmp_path / "s.npy"))
    s = m.sample(6, seed=2, gmm=3)
    assert s.shape == (6, 8, 8) and np.array_equal(s, np.load(tmp_path / "s.npy"))
    x = m.data()["x"][:200]
    assert m.sample(4, seed=1, gmm=2, x=x).shape == (4, 8, 8)
    with pytest.raises(ValueError, match="N\\(0, I\\)"):
        m.sample(3)
    with pytest.raises(ValueError, match="cannot fit 5 components"):
        m.sample(3, gmm=5, x=x[:4])


def test_fit_at_another_batch_size_and_the_memory_budget(tmp_path):
    m = aec.compile(DIGITS)
    assert m.batch == 64
    h = m.fit(epochs=1, batch=17, out=tmp_path / "b17", progress=False)
    assert m.batch == 17 and h["step"] == [96]  # ⌈1617 / 17⌉ steps
    cfg = json.loads((tmp_path / "b17" / "config.json").read_text())
    assert cfg["batch"] == 17
    aec.set_memory_limit("1K")
    try:
        with pytest.raises(ValueError, match="memory"):
            m.fit(epochs=1, out=tmp_path / "small", progress=False)
        with pytest.raises(ValueError, match="the copy of x"):
            m.encode(np.zeros((1000, 8, 8), np.float32))
    finally:
        aec.set_memory_limit(None)
    with pytest.raises(ValueError, match="is not a size: write e.g. 512M"):
        aec.set_memory_limit("lots")
    with pytest.raises(ValueError, match="not a usable memory limit"):
        aec.set_memory_limit(0)
    aec.set_memory_limit(1 << 40)
    aec.set_memory_limit(None)
