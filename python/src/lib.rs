//! `aec._aec`: the Python bindings of aec — a thin layer over the library the CLI uses.
//!
//! Every line of compiling, training and running is aec's own (`aec::compile`,
//! `aec::runtime::train`, `aec::runtime::infer`); this file converts between NumPy arrays and
//! aec's arrays, maps aec's errors to Python exceptions, and releases the GIL while native code
//! runs. `aec/__init__.py` gives it its Python shape (keyword arguments, progress bars).

use aec::data::{Array, Dataset, Values};
use aec::diag::Diagnostic;
use aec::runtime::config::Overrides;
use aec::runtime::infer::{self, Output};
use aec::runtime::train::{self, Event, TrainConfig, TrainError};
use aec::runtime::{Backend, checkpoint, dataset, generate};
use aec::{Compiled, Config};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A compiled spec and its parameters (initialised, trained or loaded).
#[pyclass(module = "aec._aec")]
struct Model {
    /// The spec's file (diagnostics name it), or `<string>`.
    file: String,
    src: String,
    /// The folder its data paths are relative to.
    dir: PathBuf,
    compiled: Compiled,
    params: Vec<Vec<f32>>,
    /// The parameters came from training or a checkpoint, not the initialisation.
    trained: bool,
}

/// `aec.SpecError` (defined in `aec/_errors.py`) with the rendered diagnostics and the data.
fn spec_error(py: Python<'_>, diags: &[Diagnostic], file: &str, src: &str) -> PyErr {
    let text = aec::diag::render(diags, file, src, false);
    let errors = diags.iter().filter(|d| d.is_error()).count();
    let text = format!("{text}aec: {errors} error{} in {file}", if errors == 1 { "" } else { "s" });
    let list = PyList::empty(py);
    for d in diags {
        let dict = PyDict::new(py);
        let (line, column) = d.span().map_or((0, 0), |s| s.line_col(src));
        let label = d.labels.first().map(|l| l.message.clone());
        let _ = dict.set_item("severity", if d.is_error() { "error" } else { "warning" });
        let _ = dict.set_item("message", &d.message);
        let _ = dict.set_item("file", file);
        let _ = dict.set_item("line", line);
        let _ = dict.set_item("column", column);
        let _ = dict.set_item("label", label);
        let _ = dict.set_item("help", d.help.clone());
        let _ = dict.set_item("notes", d.notes.clone());
        let _ = list.append(dict);
    }
    match py
        .import("aec._errors")
        .and_then(|m| m.getattr("SpecError"))
        .and_then(|c| c.call1((text.clone(), list)))
    {
        Ok(e) => PyErr::from_value(e),
        Err(e) => e,
    }
}

fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn backend(name: &str) -> PyResult<Backend> {
    match name {
        "jit" => Ok(Backend::Jit),
        "interp" => Ok(Backend::Interp),
        other => Err(PyValueError::new_err(format!("backend must be 'jit' or 'interp', got {other:?}"))),
    }
}

fn threads(t: Option<usize>) -> usize {
    t.filter(|&t| t > 0).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A NumPy array (float32, or int32/int64 token ids) as aec's array: the one copy into aec's
/// buffers. The wrapper has checked the dtype; `what` names it in errors.
fn array_in(x: &Bound<'_, PyAny>, what: &str) -> PyResult<Array> {
    // The copy is checked against the memory budget before it is made.
    if let Ok(a) = x.cast::<numpy::PyUntypedArray>() {
        let bytes = (a.len() as u64).checked_mul(4);
        aec::memory::check(&format!("the copy of {what}"), bytes, "pass fewer samples at a time")
            .map_err(value_error)?;
    }
    if let Ok(a) = x.cast::<PyArrayDyn<f32>>() {
        let a = a.readonly();
        let shape = a.shape().to_vec();
        // `as_slice` takes Fortran order too, as it lies in memory: only C order is the samples'.
        let values = match a.as_slice() {
            Ok(s) if a.is_c_contiguous() => s.to_vec(),
            _ => a.as_array().iter().copied().collect(),
        };
        return Ok(Array { shape, values: Values::F32(values) });
    }
    if let Ok(a) = x.cast::<PyArrayDyn<i32>>() {
        let a = a.readonly();
        return Ok(Array {
            shape: a.shape().to_vec(),
            values: Values::I32(a.as_array().iter().copied().collect()),
        });
    }
    Err(PyTypeError::new_err(format!("{what} must be a NumPy array of float32 (or int32 token ids)")))
}

/// aec's array as a NumPy array, without a copy: the vector becomes the array's memory.
fn array_out<'py>(py: Python<'py>, a: Array) -> PyResult<Bound<'py, PyAny>> {
    let shape = a.shape.clone();
    Ok(match a.values {
        Values::F32(v) => PyArray1::from_vec(py, v).reshape(shape)?.into_any(),
        Values::I32(v) => PyArray1::from_vec(py, v).reshape(shape)?.into_any(),
    })
}

#[pyfunction]
#[pyo3(signature = (text, file, dir, batch=None))]
/// Compiles spec text (`file` names it in diagnostics; data paths are relative to `dir`).
fn compile(py: Python<'_>, text: String, file: String, dir: PathBuf, batch: Option<u64>) -> PyResult<Model> {
    if batch.is_some_and(|b| b == 0 || b > 1 << 24) {
        return Err(PyValueError::new_err("batch must be between 1 and 16777216"));
    }
    let compiled = aec::compile(&text, &Config { batch }).map_err(|d| spec_error(py, &d, &file, &text))?;
    let init = compiled.ast.train.as_ref().and_then(|t| t.init).unwrap_or(aec::syntax::ast::Init::Default);
    let seed = compiled.ast.train.as_ref().and_then(|t| t.seed).unwrap_or(0);
    let params = aec::runtime::init::init_params(&compiled.forward, init, seed);
    let warnings = compiled.warnings.clone();
    let model = Model { file, src: text, dir, compiled, params, trained: false };
    if !warnings.is_empty() {
        let text = aec::diag::render(&warnings, &model.file, &model.src, false);
        let w = py.import("warnings")?;
        w.call_method1("warn", (text,))?;
    }
    Ok(model)
}

/// What `fit` reports to its Python callback, at most every 0.1 s and at each epoch's end.
struct Reporter {
    callback: Option<Py<PyAny>>,
    last: Instant,
    /// The first exception: a Ctrl-C (`KeyboardInterrupt`) or the callback's own.
    error: Option<PyErr>,
    stop: Arc<AtomicBool>,
}

impl Reporter {
    /// Runs `f` holding the GIL, after checking for signals (Ctrl-C); an exception stops the run.
    fn with_gil(&mut self, f: impl FnOnce(Python<'_>, Option<&Py<PyAny>>) -> PyResult<()>) {
        if self.error.is_some() {
            return;
        }
        let callback = self.callback.as_ref();
        let result = Python::attach(|py| py.check_signals().and_then(|()| f(py, callback)));
        if let Err(e) = result {
            self.error = Some(e);
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn event(&mut self, e: &Event) {
        match e {
            Event::Start { first_epoch, epochs, steps_per_epoch, train, validation } => {
                let args = (*first_epoch, *epochs, *steps_per_epoch, *train, *validation);
                self.with_gil(|py, cb| call(py, cb, "start", args));
            }
            Event::Step { epoch, step_in_epoch, loss } => {
                if self.last.elapsed() < Duration::from_millis(100) {
                    return;
                }
                self.last = Instant::now();
                let args = (*epoch, *step_in_epoch, *loss);
                self.with_gil(|py, cb| call(py, cb, "step", args));
            }
            Event::Epoch(m) => {
                let json = serde_json::to_string(m).unwrap_or_default();
                self.with_gil(|py, cb| call(py, cb, "epoch", (json,)));
            }
            _ => {}
        }
    }
}

fn call<'py>(
    py: Python<'py>,
    cb: Option<&Py<PyAny>>,
    kind: &str,
    args: impl IntoPyObject<'py, Target = pyo3::types::PyTuple>,
) -> PyResult<()> {
    if let Some(cb) = cb {
        cb.call1(py, (kind, args))?;
    }
    Ok(())
}

/// A training error as the Python exception it is: the spec's problems located in it.
fn train_error(py: Python<'_>, m: &Model, e: TrainError) -> PyErr {
    match e {
        TrainError::NonFinite { ref span, .. } => {
            let span = *span;
            let mut d = Diagnostic::error(e.to_string());
            if let Some(s) = span {
                d = d.label(s, "this layer produced it");
            }
            let d = d.help("lower the learning rate (`lr=`), or check the data's scale");
            spec_error(py, &[d], &m.file, &m.src)
        }
        TrainError::Located { message, span, label, help } => {
            spec_error(py, &[Diagnostic::error(message).label(span, label).help(help)], &m.file, &m.src)
        }
        TrainError::Io(msg) => PyOSError::new_err(msg),
        e => PyValueError::new_err(e.to_string()),
    }
}

#[pymethods]
impl Model {
    /// The model's name (the spec's `model NAME`).
    #[getter]
    fn name(&self) -> String {
        self.compiled.model.name.clone()
    }

    /// The batch size it was compiled for.
    #[getter]
    fn batch(&self) -> u64 {
        self.compiled.batch
    }

    /// The names of the model's conditions (`condition y: …`), in order.
    #[getter]
    fn conditions(&self) -> Vec<String> {
        self.compiled.model.conditions.iter().map(|v| v.name.clone()).collect()
    }

    /// Whether the code is quantized (the encoder ends in `quantize K`).
    #[getter]
    fn quantized(&self) -> bool {
        aec::sema::lower::quantizes(&self.compiled.model)
    }

    /// The codebook vectors of a quantized code's ids (`[n]` or `[n, H, W]` int32).
    fn codebook_vectors<'py>(&self, py: Python<'py>, ids: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let ids = array_in(ids, "ids")?;
        array_out(py, generate::codebook_vectors(&self.compiled, &self.params, &ids).map_err(value_error)?)
    }

    /// The `aec compile` table: every layer, its output shape and parameters.
    fn summary(&self) -> String {
        self.compiled.model.table(&self.src)
    }

    /// The names, in order, of the model's inputs, targets and conditions (what `fit` takes).
    fn variables(&self) -> Vec<(String, Vec<u64>, bool)> {
        let m = &self.compiled.model;
        m.variables()
            .map(|v| {
                let (dims, tokens) = match &v.ty {
                    aec::sema::Ty::Tensor(d) => (d.clone(), false),
                    aec::sema::Ty::Tokens { len, .. } => (vec![*len], true),
                    aec::sema::Ty::Token { .. } => (vec![], true),
                    aec::sema::Ty::Seq { len, dim } => (vec![*len, *dim], false),
                };
                (v.name.clone(), dims, tokens)
            })
            .collect()
    }

    /// Whether the parameters come from training or a checkpoint.
    fn is_trained(&self) -> bool {
        self.trained
    }

    /// Takes `other`'s parameters (the same spec compiled at another batch size).
    fn take_params(&mut self, other: PyRef<'_, Model>) -> PyResult<()> {
        let same = other.compiled.forward.params.len() == self.compiled.forward.params.len()
            && other
                .compiled
                .forward
                .params
                .iter()
                .zip(&self.compiled.forward.params)
                .all(|(a, b)| a.shape == b.shape);
        if !same {
            return Err(value_error("the two models' parameters differ"));
        }
        self.params = other.params.clone();
        self.trained = other.trained;
        Ok(())
    }

    /// The code's shape.
    fn code_shape(&self) -> PyResult<Vec<usize>> {
        generate::code_dims(&self.compiled).map_err(value_error)
    }

    /// The parameters, by PyTorch's names, as NumPy arrays (copies).
    fn params<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (p, v) in self.compiled.forward.params.iter().zip(&self.params) {
            d.set_item(&p.name, PyArray1::from_slice(py, v).reshape(p.shape.clone())?)?;
        }
        Ok(d)
    }

    /// Replaces the parameters with a checkpoint's (an aec checkpoint or a PyTorch
    /// `state_dict` saved as safetensors).
    fn load_weights(&mut self, path: PathBuf) -> PyResult<()> {
        if !path.is_file() {
            return Err(PyOSError::new_err(format!("{} is not a file", path.display())));
        }
        self.params = checkpoint::load_params(&path, &self.compiled.forward).map_err(value_error)?;
        self.trained = true;
        Ok(())
    }

    /// Writes the parameters as a checkpoint (`aec run --weights` and `aec.load` read it), all
    /// or nothing.
    fn save_weights(&self, path: PathBuf) -> PyResult<()> {
        let named: Vec<checkpoint::Named> = self
            .compiled
            .forward
            .params
            .iter()
            .zip(&self.params)
            .map(|(p, v)| (p.name.clone(), p.shape.clone(), v.clone()))
            .collect();
        let bytes = checkpoint::weights_file(&named).map_err(PyOSError::new_err)?;
        aec::files::write_atomic(&path, &bytes)
            .map_err(|e| PyOSError::new_err(format!("cannot write {}: {e}", path.display())))
    }

    /// The spec's own data (its `data` lines), as the network sees it: scaled, tokenized.
    fn data<'py>(&self, py: Python<'py>, seed: Option<u64>) -> PyResult<Bound<'py, PyDict>> {
        let seed = seed.or(self.compiled.ast.train.as_ref().and_then(|t| t.seed)).unwrap_or(0);
        let loaded = py
            .detach(|| dataset::load(&self.compiled, &self.dir, seed))
            .map_err(|d| spec_error(py, &[d], &self.file, &self.src))?;
        let d = PyDict::new(py);
        let data = loaded.data;
        let all: Vec<usize> = (0..data.n).collect();
        let vars = self.variables();
        for (k, name) in data.names.iter().enumerate() {
            let values = data.gather(k, &all).map_err(value_error)?;
            // The declared shape (`[1, 8, 8]` of `(n, 8, 8)` data), as the network takes it.
            let stored = &data.arrays[k].shape()[1..];
            let declared = vars.get(k).map(|v| v.1.iter().map(|&d| d as usize).collect::<Vec<_>>());
            let sample = match declared {
                Some(d) if d.iter().product::<usize>() == stored.iter().product::<usize>() => d,
                _ => stored.to_vec(),
            };
            let shape = std::iter::once(data.n).chain(sample).collect();
            d.set_item(name, array_out(py, Array { shape, values })?)?;
        }
        Ok(d)
    }

    /// Trains natively with the GIL released. `arrays` are the inputs then targets (None: the
    /// spec's data). Returns (the epochs' metrics as JSON lines, interrupted, saved epoch).
    #[pyo3(signature = (arrays, out, epochs=None, lr=None, seed=None, validation=None, threads=None,
                        backend="jit", resume=false, stop_at=None, callback=None))]
    #[allow(clippy::too_many_arguments)]
    fn fit(
        &mut self,
        py: Python<'_>,
        arrays: Option<Vec<Bound<'_, PyAny>>>,
        out: PathBuf,
        epochs: Option<u64>,
        lr: Option<f64>,
        seed: Option<u64>,
        validation: Option<f64>,
        threads: Option<usize>,
        backend: &str,
        resume: bool,
        stop_at: Option<u64>,
        callback: Option<Py<PyAny>>,
    ) -> PyResult<(Vec<String>, bool, Option<u64>)> {
        if epochs == Some(0) || stop_at == Some(0) {
            return Err(PyValueError::new_err("epochs and stop_at count from 1"));
        }
        // A run's configuration holds the handle of an MPI run (not `Send`): it is made again
        // inside the part that runs without the GIL.
        let config = || -> Result<TrainConfig, String> {
            let overrides = Overrides {
                epochs,
                lr,
                seed,
                validation,
                threads: self::threads(threads),
                backend: self::backend(backend).map_err(|_| format!("unknown backend {backend:?}"))?,
                out: out.clone(),
                resume,
                init_from: None,
                stop_at,
                beam: (1, 0.6),
                dist: None,
            };
            let mut cfg = TrainConfig::of(&self.compiled, overrides)?;
            if self.trained {
                cfg.init_values = Some(Arc::new(self.params.clone()));
            }
            let (_, json) = aec::runtime::config::describe(&cfg);
            cfg.config_json = Some(json);
            Ok(cfg)
        };
        self::backend(backend)?;
        let run_seed = config().map_err(value_error)?.seed;
        if resume
            && !out.join("checkpoint.safetensors").is_file()
            && !out.join(checkpoint::MANIFEST).is_file()
        {
            return Err(PyOSError::new_err(format!(
                "nothing to resume in {}: it has no checkpoint.safetensors",
                out.display()
            )));
        }
        if out.exists() && !out.is_dir() {
            return Err(PyOSError::new_err(format!(
                "out={} is a file; give a folder for the run",
                out.display()
            )));
        }
        std::fs::create_dir_all(&out)
            .map_err(|e| PyOSError::new_err(format!("cannot create {}: {e}", out.display())))?;
        let data: Dataset = match arrays {
            Some(list) => {
                let names: Vec<String> = self.variables().into_iter().map(|v| v.0).collect();
                let arrays = list
                    .iter()
                    .enumerate()
                    .map(|(k, a)| array_in(a, names.get(k).map_or("an array", String::as_str)))
                    .collect::<PyResult<Vec<_>>>()?;
                let origin = |k: usize| match names.get(k) {
                    Some(n) => format!("the array for `{n}`"),
                    None => "an array".to_owned(),
                };
                py.detach(|| dataset::from_arrays(&self.compiled, arrays, &origin)).map_err(value_error)?
            }
            None => {
                py.detach(|| dataset::load(&self.compiled, &self.dir, run_seed))
                    .map_err(|d| spec_error(py, &[d], &self.file, &self.src))?
                    .data
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut reporter = Reporter { callback, last: Instant::now(), error: None, stop: stop.clone() };
        // The GIL is released while aec trains; the reporter takes it back briefly to report
        // progress and to see a Ctrl-C.
        let result = py.detach(|| {
            let cfg = TrainConfig { interrupt: Some(stop), ..config().map_err(TrainError::Data)? };
            let mut on = |e: Event| reporter.event(&e);
            train::train(&self.compiled, &data, &cfg, &mut on).map(|s| (s, reporter))
        });
        let (summary, reporter) = result.map_err(|e| train_error(py, self, e))?;
        if let Some(err) = reporter.error
            && !err.is_instance_of::<PyKeyboardInterrupt>(py)
        {
            return Err(err);
        }
        self.params = summary.params;
        self.trained = true;
        let lines = summary.metrics.iter().map(|m| serde_json::to_string(m).unwrap_or_default()).collect();
        Ok((lines, summary.interrupted, summary.saved_epoch))
    }

    /// Runs the network on `x`: `what` is "code", "recon" (greedy decoding for a teacher-forced
    /// decoder) or "generated" (the decoder alone, from codes).
    /// `conditions`: a conditioned model's condition values, one array per condition.
    #[pyo3(signature = (x, what, batch=256, threads=None, backend="jit", conditions=None))]
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        what: &str,
        batch: usize,
        threads: Option<usize>,
        backend: &str,
        conditions: Option<Vec<Bound<'py, PyAny>>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let vars = &self.compiled.model.conditions;
        let given = conditions.unwrap_or_default();
        if given.len() != vars.len() {
            let names: Vec<String> = vars.iter().map(|v| format!("`{}` ({})", v.name, v.ty)).collect();
            return Err(PyValueError::new_err(match vars.len() {
                0 => "condition= is for a conditioned model, and this one has no condition".to_owned(),
                _ => format!("this model is conditioned on {}: pass condition=", names.join(", ")),
            }));
        }
        let conditions = given
            .iter()
            .zip(vars)
            .map(|(a, v)| {
                let a = array_in(a, &v.name)?;
                aec::data::conform(a, v, &format!("condition `{}`", v.name)).map_err(value_error)
            })
            .collect::<PyResult<Vec<Array>>>()?;
        let x = array_in(x, if what == "generated" { "z" } else { "x" })?;
        let output = match what {
            "code" => Output::Code,
            "code_ids" => Output::CodeIds,
            "recon" => Output::Recon,
            "generated" => Output::Generated,
            other => return Err(PyValueError::new_err(format!("unknown output {other:?}"))),
        };
        let backend = self::backend(backend)?;
        let threads = self::threads(threads);
        let x = if output == Output::Generated {
            self.check_codes(x)?
        } else {
            let var =
                self.compiled.model.inputs.first().ok_or_else(|| value_error("the model has no input"))?;
            aec::data::conform(x, var, "x").map_err(value_error)?
        };
        let c = &self.compiled;
        let params = &self.params;
        let y = py.detach(|| match aec::runtime::decode::Decoder::new(c, backend, threads) {
            Some(mut d) if output == Output::Recon => {
                infer::decode(&mut d, params, &x, batch, infer::Search::GREEDY).map(|(y, _)| y)
            }
            _ => infer::infer_with(c, params, (&x, &conditions), output, batch.max(1), threads, backend),
        });
        array_out(py, y.map_err(value_error)?)
    }

    /// `n` codes drawn from the prior N(0, I) of a Gaussian code, with `seed` (as `aec sample`).
    fn prior_codes<'py>(&self, py: Python<'py>, n: usize, seed: u64) -> PyResult<Bound<'py, PyAny>> {
        let dims = generate::code_dims(&self.compiled).map_err(value_error)?;
        let z = generate::prior_codes(&self.compiled, n, seed).map_err(value_error)?;
        array_out(py, Array { shape: [vec![n], dims].concat(), values: Values::F32(z) })
    }

    /// `n` draws from a mixture of `k` Gaussians fitted to the codes of `x` (None: of the spec's
    /// training data, as `aec sample --gmm` fits it); returns (codes, mean log-likelihood, EM
    /// iterations).
    #[pyo3(signature = (k, n, seed, x=None, threads=None, backend="jit"))]
    #[allow(clippy::too_many_arguments)]
    fn mixture_codes<'py>(
        &self,
        py: Python<'py>,
        k: usize,
        n: usize,
        seed: u64,
        x: Option<&Bound<'py, PyAny>>,
        threads: Option<usize>,
        backend: &str,
    ) -> PyResult<(Bound<'py, PyAny>, f64, usize)> {
        let how = (self::threads(threads), self::backend(backend)?);
        let dims = generate::code_dims(&self.compiled).map_err(value_error)?;
        let c = &self.compiled;
        let (z, size) = match x {
            Some(x) => {
                let var = c.model.inputs.first().ok_or_else(|| value_error("the model has no input"))?;
                let x = aec::data::conform(array_in(x, "x")?, var, "x").map_err(value_error)?;
                py.detach(|| generate::codes_of(c, &self.params, &x, how)).map_err(value_error)?
            }
            None => {
                let split = generate::spec_split(c);
                let data = py
                    .detach(|| dataset::load(c, &self.dir, split.1))
                    .map_err(|d| spec_error(py, &[d], &self.file, &self.src))?
                    .data;
                py.detach(|| generate::training_codes(c, &self.params, &data, split, how))
                    .map_err(value_error)?
            }
        };
        let fit = py.detach(|| aec::runtime::gmm::fit(&z, size, k, seed)).map_err(value_error)?;
        let draws = fit.gmm.sample(n, seed);
        let codes = array_out(py, Array { shape: [vec![n], dims].concat(), values: Values::F32(draws) })?;
        Ok((codes, fit.history.last().copied().unwrap_or(f64::NAN), fit.history.len()))
    }

    /// The straight line of `steps` codes between each consecutive pair of codes `z`.
    fn lines<'py>(
        &self,
        py: Python<'py>,
        z: &Bound<'py, PyAny>,
        steps: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let z = self.check_codes(array_in(z, "z")?)?;
        let dims = generate::code_dims(&self.compiled).map_err(value_error)?;
        let size: usize = dims.iter().product();
        let Values::F32(v) = &z.values else { return Err(PyTypeError::new_err("codes are float32")) };
        let line = generate::lines(v, size, steps.max(2));
        let n = line.len() / size.max(1);
        array_out(py, Array { shape: [vec![n], dims].concat(), values: Values::F32(line) })
    }

    /// The `--emit torch` module's source (a `torch.nn.Module` named after the model).
    fn torch_source(&self) -> String {
        aec::sema::torch::emit(&self.compiled.model)
    }

    /// Writes an ONNX file of `part` ("model", "encoder", "decoder" or "step").
    #[pyo3(signature = (path, part="model", opset=aec::onnx::DEFAULT_OPSET))]
    fn export_onnx(&self, path: PathBuf, part: &str, opset: i64) -> PyResult<()> {
        use aec::onnx::Export;
        use prost::Message;
        let part = match part {
            "model" => Export::Model,
            "encoder" => Export::Encoder,
            "decoder" => Export::Decoder,
            "step" => Export::Step,
            other => {
                return Err(PyValueError::new_err(format!(
                    "part must be 'model', 'encoder', 'decoder' or 'step', got {other:?}"
                )));
            }
        };
        if !aec::onnx::OPSETS.contains(&opset) {
            return Err(PyValueError::new_err(format!(
                "opset {opset}: aec writes opsets {} to {}",
                aec::onnx::OPSETS.start(),
                aec::onnx::OPSETS.end()
            )));
        }
        let model =
            aec::onnx::export(&self.compiled.model, &self.params, part, opset).map_err(value_error)?;
        aec::files::write_atomic(&path, &model.encode_to_vec())
            .map_err(|e| PyOSError::new_err(format!("cannot write {}: {e}", path.display())))
    }
}

impl Model {
    /// Codes checked against the code's shape.
    fn check_codes(&self, z: Array) -> PyResult<Array> {
        let dims = generate::code_dims(&self.compiled).map_err(value_error)?;
        if z.shape.len() != dims.len() + 1 || z.shape[1..] != dims[..] {
            return Err(PyValueError::new_err(format!(
                "codes of this model are [n, {}] float32 arrays, got shape {:?}",
                dims.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                z.shape
            )));
        }
        if let Values::F32(v) = &z.values
            && v.iter().any(|x| !x.is_finite())
        {
            return Err(PyValueError::new_err("the codes contain NaN or infinity"));
        }
        Ok(z)
    }
}

/// Sets aec's memory budget as `--memory-limit` does (a size such as "2G", parsed by the
/// same function); `None` restores the default.
#[pyfunction]
#[pyo3(signature = (size=None))]
fn set_memory_limit(size: Option<&str>) -> PyResult<()> {
    match size {
        Some(text) => aec::memory::set_limit(aec::memory::parse_size(text).map_err(value_error)?),
        None => aec::memory::clear_limit(),
    }
    Ok(())
}

#[pymodule]
fn _aec(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add_function(wrap_pyfunction!(set_memory_limit, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
