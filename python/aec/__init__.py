"""aec from Python: compile a spec, train it natively on NumPy arrays, get codes back.

    import aec
    m = aec.compile("specs/digits_mlp.ae")
    hist = m.fit(epochs=20)              # the spec's own data, or m.fit(x) on an array
    z = m.encode(x)                      # float32 in, float32 out

Everything runs in aec's compiler and runtime (the extension ``aec._aec``), the very code the
``aec`` command runs: the same spec trains to the same bits from either.
"""

from __future__ import annotations

import builtins
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np

from . import _aec
from ._errors import SpecError

__all__ = ["Model", "SpecError", "compile", "load", "set_memory_limit", "__version__"]
__version__: str = _aec.__version__

PathLike = Union[str, "os.PathLike[str]"]
ArrayLike = Any


def set_memory_limit(limit: Union[int, str, None]) -> None:
    """aec's memory budget (``--memory-limit``): bytes, or a size such as ``"2G"``; ``None``
    restores the default (what this process may use, less a margin)."""
    if isinstance(limit, bool) or not isinstance(limit, (int, str, type(None))):
        raise TypeError(f"a memory limit is a size such as '2G' or a number of bytes, got {limit!r}")
    _aec.set_memory_limit(None if limit is None else str(limit))


def _read_spec(spec: PathLike) -> "tuple[str, str, str]":
    """(text, file name for diagnostics, folder of its data) of a path or of spec text."""
    if isinstance(spec, os.PathLike) or (
        isinstance(spec, str) and "\n" not in spec and "{" not in spec
    ):
        path = Path(os.fspath(spec))
        if not path.is_file():
            raise FileNotFoundError(f"no spec at {path}" + ("" if path.suffix == ".ae" else " (a path to a .ae file, or spec text)"))
        return path.read_text(), str(path), str(path.parent)
    if not isinstance(spec, str):
        raise TypeError(f"compile takes a path to a .ae file or spec text, got {type(spec).__name__}")
    return spec, "<string>", os.getcwd()


def compile(spec: PathLike, batch: Optional[int] = None) -> "Model":
    """Compiles a spec: a path to a ``.ae`` file, or its text.

    Every mistake in it raises one :class:`SpecError` whose message is the located diagnostic
    ``aec compile`` prints. ``batch`` replaces the train block's batch size.
    """
    text, file, folder = _read_spec(spec)
    return Model._new(_aec.compile(text, file, folder, batch), text, file, folder)


def load(spec: PathLike, weights: PathLike, batch: Optional[int] = None) -> "Model":
    """A spec with trained weights: a run folder (its ``checkpoint.safetensors``) or a
    safetensors file (an aec checkpoint, or a PyTorch ``state_dict`` with the spec's names)."""
    m = compile(spec, batch)
    path = Path(os.fspath(weights))
    if path.is_dir():
        path = path / "checkpoint.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    m._m.load_weights(str(path))
    return m


class Model:
    """A compiled spec and its parameters (initialised, trained or loaded)."""

    _m: Any

    @classmethod
    def _new(cls, inner: Any, text: str, file: str, folder: str) -> "Model":
        m = cls.__new__(cls)
        m._m, m._text, m._file, m._folder = inner, text, file, folder
        m._vars = inner.variables()
        return m

    def __repr__(self) -> str:
        names = ", ".join(v[0] for v in self._vars)
        return f"<aec.Model {self.name} ({names}), batch {self.batch}>"

    @property
    def name(self) -> str:
        """The spec's model name."""
        return self._m.name

    @property
    def batch(self) -> int:
        """The batch size the model is compiled for."""
        return self._m.batch

    @property
    def code_shape(self) -> tuple:
        """The shape of one sample's code."""
        return tuple(self._m.code_shape())

    def summary(self) -> str:
        """The table ``aec compile`` prints: layers, shapes, parameters, FLOPs."""
        return self._m.summary()

    @property
    def params(self) -> Dict[str, np.ndarray]:
        """The parameters by PyTorch's names (copies)."""
        return dict(self._m.params())

    def data(self) -> Dict[str, np.ndarray]:
        """The spec's own data (its ``data`` lines) as the network sees it: scaled, tokenized."""
        return dict(self._m.data(None))

    # -- training --------------------------------------------------------------------------

    def fit(
        self,
        x: Union[ArrayLike, Mapping[str, ArrayLike], None] = None,
        target: Optional[ArrayLike] = None,
        *,
        epochs: Optional[int] = None,
        batch: Optional[int] = None,
        lr: Optional[float] = None,
        validation: Optional[float] = None,
        out: Optional[PathLike] = None,
        seed: Optional[int] = None,
        threads: Optional[int] = None,
        backend: str = "jit",
        resume: bool = False,
        stop_at: Optional[int] = None,
        progress: bool = True,
    ) -> Dict[str, List[Any]]:
        """Trains natively, with the GIL released; returns the history, what ``metrics.jsonl``
        holds, as a dict of lists (``epoch``, ``train_loss``, ``val_loss``, …).

        ``x`` is the first input's samples (float32, fed as they are: the spec's ``scale``
        applies to its own data only), or a dict by variable name; ``target`` the declared
        target's, if the spec has one. Without ``x`` the spec's own data is used. Unset
        settings come from the spec's ``train`` block. The run folder ``out`` (default
        ``runs/<model>``) gets the checkpoints and metrics ``aec run --train`` writes; a model
        already trained or loaded goes on from its weights (as Keras's ``fit``), and
        ``resume=True`` continues the run in ``out`` exactly where its last save left it.

        Ctrl-C stops after the step under way and returns the history; the run folder keeps
        its last committed save (``resume=True`` goes on from it).
        """
        if batch is not None and batch != self.batch:
            again = _aec.compile(self._text, self._file, self._folder, int(batch))
            if self._m.is_trained():
                again.take_params(self._m)
            self._m = again
        arrays = None if x is None else self._arrays(x, target)
        run = Path(os.fspath(out)) if out is not None else Path("runs") / self.name
        bar = _Progress() if progress else None
        lines, interrupted, saved = self._m.fit(
            arrays,
            str(run),
            epochs=_count(epochs, "epochs"),
            lr=lr,
            seed=seed,
            validation=validation,
            threads=threads,
            backend=backend,
            resume=resume,
            stop_at=_count(stop_at, "stop_at"),
            callback=bar,
        )
        if bar is not None:
            bar.close()
        history = _history(lines)
        if interrupted:
            where = (
                f"the run folder {run} keeps its save of epoch {saved}: go on with fit(..., out={str(run)!r}, resume=True)"
                if saved
                else f"before the first save: nothing in {run} to resume"
            )
            warnings.warn(f"training interrupted; {where}", RuntimeWarning, stacklevel=2)
        return history

    def _arrays(self, x: Any, target: Any) -> List[np.ndarray]:
        if isinstance(x, Mapping):
            given = dict(x)
            if target is not None:
                raise TypeError("give the target in the dict, or x and target as arrays, not both")
            missing = [v[0] for v in self._vars if v[0] not in given]
            unknown = [k for k in given if k not in {v[0] for v in self._vars}]
            if unknown:
                raise ValueError(f"{self.name} has no variable {unknown[0]!r}; it takes {[v[0] for v in self._vars]}")
            if missing:
                raise ValueError(f"no array for {missing[0]!r}; {self.name} takes {[v[0] for v in self._vars]}")
            return [_as_array(given[v[0]], v) for v in self._vars]
        first = [_as_array(x, self._vars[0])]
        rest = self._vars[1:]
        if not rest:
            if target is not None:
                raise ValueError(f"{self.name} declares no target: its loss compares with its input")
            return first
        if target is None:
            raise ValueError(f"{self.name} also takes `{rest[0][0]}`: pass target= (or a dict of arrays)")
        if len(rest) > 1:
            raise ValueError(f"{self.name} takes {[v[0] for v in self._vars]}: pass a dict of arrays")
        return first + [_as_array(target, rest[0])]

    # -- running ---------------------------------------------------------------------------

    @property
    def quantized(self) -> bool:
        """Whether the code is quantized (a VQ-VAE: the encoder ends in ``quantize K``)."""
        return self._m.quantized

    @property
    def conditions(self) -> List[str]:
        """The names of the model's conditions (``condition y: token[10]``), in order."""
        return list(self._m.conditions)

    def _conditions(self, condition: Any, n: int) -> Optional[List[np.ndarray]]:
        """``condition=`` as one array per condition: an array (one condition), a dict by name,
        or a class id for every sample (a ``token[N]`` condition)."""
        names = self.conditions
        if condition is None:
            return None
        if not names:
            raise ValueError(f"condition= is for a conditioned model, and {self.name} has none")
        given = condition if isinstance(condition, dict) else {names[0]: condition}
        if len(names) > 1 and not isinstance(condition, dict):
            raise ValueError(f"{self.name} has conditions {names}: pass a dict by name")
        unknown = [k for k in given if k not in names]
        if unknown:
            raise ValueError(f"{self.name} has no condition {unknown[0]!r}; its conditions are {names}")
        out = []
        for name in names:
            if name not in given:
                raise ValueError(f"no value for the condition {name!r}")
            value = given[name]
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                value = np.full(n, int(value), dtype=np.int32)
            value = np.asarray(value)
            if value.dtype.kind in "iu":
                value = value.astype(np.int32)
            out.append(np.ascontiguousarray(value))
        return out

    def encode(
        self,
        x: ArrayLike,
        *,
        vectors: bool = False,
        condition: Any = None,
        threads: Optional[int] = None,
        backend: str = "jit",
    ) -> np.ndarray:
        """The codes of the samples ``x`` (as ``aec encode --raw-input``): a quantized code's
        int32 ids (``[n]``, or ``[n, H, W]``, one per position of an image code), or with
        ``vectors=True`` the codebook vectors they pick. A conditioned model takes its
        ``condition`` (an array with a value per sample, a class id, or a dict by name)."""
        if vectors and not self.quantized:
            raise ValueError("vectors=True asks for a quantized code's codebook vectors; this code has no quantizer")
        what = "code_ids" if self.quantized and not vectors else "code"
        x = _as_array(x, self._vars[0])
        c = self._conditions(condition, len(x))
        return self._m.run(x, what, threads=threads, backend=backend, conditions=c)

    def reconstruct(
        self, x: ArrayLike, *, condition: Any = None, threads: Optional[int] = None, backend: str = "jit"
    ) -> np.ndarray:
        """The network's outputs for ``x`` (greedy decoding for a sequence decoder), under a
        conditioned model's ``condition``."""
        x = _as_array(x, self._vars[0])
        c = self._conditions(condition, len(x))
        return self._m.run(x, "recon", threads=threads, backend=backend, conditions=c)

    def decode(
        self, z: ArrayLike, *, condition: Any = None, threads: Optional[int] = None, backend: str = "jit"
    ) -> np.ndarray:
        """The decoder's outputs for the codes ``z`` (``[n, *code_shape]`` float32), or for a
        quantized code's ids (int32, as ``encode`` gives them), under a conditioned model's
        ``condition``."""
        if self.quantized and np.asarray(z).dtype.kind in "iu":
            z = self._m.codebook_vectors(np.ascontiguousarray(z, dtype=np.int32))
        z = _as_codes(z, self.code_shape)
        c = self._conditions(condition, len(z))
        return self._m.run(z, "generated", threads=threads, backend=backend, conditions=c)

    def sample(
        self,
        n: int,
        seed: int = 0,
        *,
        gmm: Optional[int] = None,
        x: Optional[ArrayLike] = None,
        condition: Any = None,
        threads: Optional[int] = None,
        backend: str = "jit",
    ) -> np.ndarray:
        """``n`` generated samples: codes drawn from N(0, I), the prior of a variational
        autoencoder's Gaussian code (``aec sample``'s draws for the same seed); or, with
        ``gmm=K``, from a mixture of K Gaussians fitted to the codes of ``x`` (default: the
        spec's training data, as ``aec sample --gmm K``), which any autoencoder can sample.
        A conditioned model draws under ``condition``: a class id (``aec sample --condition
        3``), an array with a value per sample, or a dict by name."""
        if gmm is None:
            if x is not None:
                raise TypeError("x gives the codes a mixture is fitted to: pass gmm=K too")
            z = self._m.prior_codes(_count(n, "n"), int(seed))
        else:
            data = None if x is None else _as_array(x, self._vars[0])
            z, _, _ = self._m.mixture_codes(_count(gmm, "gmm"), _count(n, "n"), int(seed), data, threads, backend)
        c = self._conditions(condition, len(z))
        return self._m.run(z, "generated", threads=threads, backend=backend, conditions=c)

    def interpolate(
        self, a: ArrayLike, b: ArrayLike, steps: int = 8, *, threads: Optional[int] = None, backend: str = "jit"
    ) -> np.ndarray:
        """Decodes ``steps`` points on the straight line between the codes of the samples
        ``a`` and ``b`` (one sample each), both ends included."""
        if _count(steps, "steps") < 2:
            raise ValueError("steps counts both ends: at least 2")
        pair = np.concatenate([_one(a, self._vars[0], "a"), _one(b, self._vars[0], "b")])
        z = self._m.run(pair, "code", threads=threads, backend=backend)
        line = self._m.lines(z, int(steps))
        return self._m.run(line, "generated", threads=threads, backend=backend)

    # -- saving and export -----------------------------------------------------------------

    def save(self, path: PathLike) -> Path:
        """Writes the weights, all or nothing: into a folder as ``checkpoint.safetensors`` (with
        the spec beside it as ``model.ae``), or to a ``.safetensors`` file. Returns the file."""
        p = Path(os.fspath(path))
        if p.suffix != ".safetensors":
            p.mkdir(parents=True, exist_ok=True)
            if self._file != "<string>" or not (p / "model.ae").exists():
                (p / "model.ae").write_text(self._text)
            p = p / "checkpoint.safetensors"
        self._m.save_weights(str(p))
        return p

    def torch_source(self) -> str:
        """The PyTorch module ``aec compile --emit torch`` writes."""
        return self._m.torch_source()

    def to_torch(self) -> Any:
        """The model as a ``torch.nn.Module`` with these weights loaded (strictly)."""
        try:
            import torch
        except ImportError as e:
            raise ImportError("to_torch needs PyTorch: pip install torch") from e
        scope: Dict[str, Any] = {"__name__": f"aec_torch_{self.name}"}
        exec(builtins.compile(self.torch_source(), f"<aec --emit torch {self.name}>", "exec"), scope)
        module = scope["Model"]()
        state = {k: torch.from_numpy(v) for k, v in self.params.items()}
        module.load_state_dict(state, strict=True)
        return module.eval()

    def export_onnx(self, path: PathLike, part: str = "model", opset: int = 17) -> Path:
        """Writes the model (``part``: model, encoder, decoder or step) as ONNX (``aec export``)."""
        p = Path(os.fspath(path))
        self._m.export_onnx(str(p), part, int(opset))
        return p


def _count(n: Optional[int], what: str) -> Optional[int]:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{what} must be a whole number from 1, got {n!r}")
    return int(n)


def _describe(var: tuple) -> str:
    name, dims, tokens = var
    shape = ", ".join(["n"] + [str(d) for d in dims])
    return f"`{name}` takes [{shape}] {'int32 token ids' if tokens else 'float32'}"


def _as_array(x: Any, var: tuple) -> np.ndarray:
    """A float32 (or int32 token id) array for ``var``, without a copy when it already is one."""
    name, dims, tokens = var
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__array__") or isinstance(x, (list, tuple)):
            x = np.asarray(x)
        else:
            raise TypeError(f"{_describe(var)}; got {type(x).__name__}")
    if tokens:
        if x.dtype.kind not in "iu":
            raise TypeError(f"{_describe(var)}; got {x.dtype}")
        if x.dtype != np.int32:
            if x.size and (x.min() < np.iinfo(np.int32).min or x.max() > np.iinfo(np.int32).max):
                raise ValueError(f"`{name}` holds ids outside int32")
            x = x.astype(np.int32)
        return x
    if x.dtype != np.float32:
        raise TypeError(f"{_describe(var)}; got {x.dtype} (convert with .astype(np.float32))")
    return x


def _one(x: Any, var: tuple, what: str) -> np.ndarray:
    a = _as_array(x, var)
    if a.size == int(np.prod(var[1])):
        a = a.reshape((1, *var[1]))
    if a.shape[0] != 1:
        raise ValueError(f"{what} is one sample, of shape {tuple(var[1])}; got {a.shape}")
    return a


def _as_codes(z: Any, shape: tuple) -> np.ndarray:
    a = _as_array(z, ("z", list(shape), False))
    if a.shape[1:] != shape:
        raise ValueError(f"codes are [n, {', '.join(map(str, shape))}] float32; got shape {a.shape}")
    return a


def _history(lines: List[str]) -> Dict[str, List[Any]]:
    """metrics.jsonl's records as columns; nested records (``terms``) become ``terms.kl``."""
    rows = [json.loads(line) for line in lines]
    flat: List[Dict[str, Any]] = []
    for r in rows:
        f: Dict[str, Any] = {}
        for k, v in r.items():
            if isinstance(v, dict):
                for sub, w in v.items():
                    f[f"{k}.{sub}"] = w
            else:
                f[k] = v
        flat.append(f)
    keys: List[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    return {k: [f.get(k) for f in flat] for k in keys}


class _Progress:
    """The training progress: tqdm's bar when tqdm is installed (a widget in Jupyter), else a
    line on a terminal's stderr, else nothing."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.text = False
        self.first = 0
        self.steps = 1
        self.total = 0
        self.done = 0

    def __call__(self, kind: str, args: tuple) -> None:
        if kind == "start":
            first, epochs, steps, _train, _val = args
            self.first, self.steps = first, max(steps, 1)
            self.total = (epochs - first) * self.steps
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=self.total, unit="step", desc="training", leave=True)
            except ImportError:
                self.text = sys.stderr.isatty()
        elif kind == "step":
            epoch, step, loss = args
            self._move(epoch, step, f"epoch {epoch}, loss {loss:.6f}")
        elif kind == "epoch":
            m = json.loads(args[0])
            val = m.get("val_loss")
            status = f"epoch {m['epoch']}, loss {m['train_loss']:.6f}"
            if val is not None:
                status += f", val {val:.6f}"
            self._move(m["epoch"], self.steps, status)

    def _move(self, epoch: int, step: int, status: str) -> None:
        # `epoch` counts the whole run's epochs (a resumed run's too); the bar, this call's steps.
        done = min(self.total, (epoch - 1 - self.first) * self.steps + step)
        if self.bar is not None:
            self.bar.update(max(0, done - self.done))
            self.bar.set_postfix_str(status, refresh=False)
        elif self.text:
            width = 30
            filled = int(width * done / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {status}   ")
            sys.stderr.flush()
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.text:
            sys.stderr.write("\n")
