//! The data a spec's `train` block names, bound to the model's inputs and targets: each
//! variable's `data` line loaded (a batch at a time where it can be), sentence pairs tokenized
//! with vocabularies from the training split, the sample counts checked against each other.

use crate::data::{self, Array, Dataset, Values};
use crate::diag::{Diagnostic, Span};
use crate::sema::{Compiled, Ty};
use crate::syntax::ast::DataSource;
use std::path::Path;

/// A spec's data, with what the loading has to say (a CSV header line it skipped).
pub struct Loaded {
    pub data: Dataset,
    pub notes: Vec<String>,
}

/// Loads every model variable's data (paths relative to `dir`, the spec's folder), each
/// problem located at its `data` line.
pub fn load(c: &Compiled, dir: &Path, seed: u64) -> Result<Loaded, Diagnostic> {
    let model = &c.model;
    let train = c.ast.train.as_ref();
    let bindings = train.map(|t| t.data.as_slice()).unwrap_or(&[]);
    let vars: Vec<_> = model.variables().collect();
    let fail = |message: String, span: Span, label: &str| Diagnostic::error(message).label(span, label);
    let mut arrays = Vec::new();
    let mut notes = Vec::new();
    let mut text: Option<(Vec<Array>, data::text::TextVocab)> = None;
    for (k, var) in vars.iter().enumerate() {
        // An unnamed binding feeds the first input; a sequence task's also feeds a target
        // (the copy, the reversal or the translation of its sentences).
        let binding = bindings.iter().find(|b| match &b.binding {
            Some(name) => name.name == var.name,
            None => k == 0 || b.source.is_sequence_task(),
        });
        let Some(binding) = binding else {
            let at = train.map_or(var.span, |t| t.span);
            let what = if k == 0 {
                "data npy(\"x.npy\")".to_owned()
            } else {
                format!("data {}: npy(\"….npy\")", var.name)
            };
            return Err(fail(
                format!("no data for `{}`", var.name),
                at,
                &format!("add `{what}` to the train block"),
            ));
        };
        if let DataSource::Text { path, tokens, min_count } = &binding.source {
            // Every variable the text feeds, its column and size: the vocabularies are built
            // once, from the training split.
            let columns: Vec<(usize, (usize, usize))> = vars
                .iter()
                .enumerate()
                .filter_map(|(k, v)| match v.ty {
                    Ty::Tokens { len, vocab } if v.padded => {
                        Some((usize::from(k > 0), (len as usize, vocab as usize)))
                    }
                    _ => None,
                })
                .collect();
            if !matches!(var.ty, Ty::Tokens { .. }) || !var.padded {
                return Err(fail(
                    format!("`text` gives sentences of token ids, and `{}` is {}", var.name, var.ty),
                    var.span,
                    &format!("declare `{}: seq[<= N] of token[V]`: up to N tokens, padded", var.name),
                ));
            }
            if text.is_none() {
                let fraction = train.and_then(|t| t.validation).unwrap_or(0.0);
                let loaded =
                    data::text::load(&dir.join(path), *tokens, *min_count, &columns, (fraction, seed))
                        .map_err(|e| fail(e.to_string(), binding.span, "this data"))?;
                text = Some(loaded);
            }
            let at = columns.iter().position(|c| c.0 == usize::from(k > 0)).unwrap_or(0);
            arrays.push(data::Column::Memory(
                text.as_ref()
                    .map(|t| t.0[at].clone())
                    .unwrap_or_else(|| Array { shape: vec![0], values: Values::I32(Vec::new()) }),
            ));
            continue;
        }
        if let DataSource::Csv { path, .. } = &binding.source
            && let Some(header) = data::csv_header(&dir.join(path))
        {
            notes.push(format!("skipped the header line of {path}: {header}"));
        }
        let part = usize::from(k > 0);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let column = data::load_column(&binding.source, dir, var, (seed, part, threads))
            .map_err(|e| fail(e.to_string(), binding.span, "this data"))?;
        arrays.push(column);
    }
    // A binding of an unknown name never gets here: `crate::compile` refuses it (`check_data`).
    let n = arrays.first().map_or(0, data::Column::samples);
    if let Some((k, a)) = arrays.iter().enumerate().find(|(_, a)| a.samples() != n) {
        let span = bindings.get(k).map_or(Span::default(), |b| b.span);
        return Err(fail(
            format!("`{}` has {} samples, `{}` has {n}", vars[k].name, a.samples(), vars[0].name),
            span,
            "sample counts differ",
        ));
    }
    check_split(c, n)?;
    let vocab = text.map(|t| t.1);
    let data = Dataset { arrays, names: vars.iter().map(|v| v.name.clone()).collect(), n, vocab };
    Ok(Loaded { data, notes })
}

/// Arrays given in memory (by the Python package) as the model's inputs and targets, in the
/// order of `Compiled::model`'s inputs then targets, each checked against its variable's type
/// (`origin(k)` names the k-th in errors).
pub fn from_arrays(
    c: &Compiled,
    arrays: Vec<Array>,
    origin: &dyn Fn(usize) -> String,
) -> Result<Dataset, String> {
    let model = &c.model;
    let vars: Vec<_> = model.variables().collect();
    if arrays.len() != vars.len() {
        let names: Vec<String> = vars.iter().map(|v| format!("`{}`", v.name)).collect();
        let s = if vars.len() == 1 { "" } else { "s" };
        return Err(format!(
            "{} takes {} array{s} ({}), given {}",
            model.name,
            vars.len(),
            names.join(", "),
            arrays.len()
        ));
    }
    let mut columns = Vec::with_capacity(arrays.len());
    for (k, (a, var)) in arrays.into_iter().zip(&vars).enumerate() {
        // The shape, the dtype of token ids, NaN and infinity, and no samples: all checked here.
        let a = data::conform(a, var, &origin(k)).map_err(|e| e.to_string())?;
        columns.push(data::Column::Memory(a));
    }
    let n = columns.first().map_or(0, data::Column::samples);
    if let Some((k, a)) = columns.iter().enumerate().find(|(_, a)| a.samples() != n) {
        return Err(format!("{} has {} samples, {} has {n}", origin(k), a.samples(), origin(0)));
    }
    check_split(c, n).map_err(|d| d.message)?;
    Ok(Dataset { arrays: columns, names: vars.iter().map(|v| v.name.clone()).collect(), n, vocab: None })
}

/// A validation split needs two samples.
fn check_split(c: &Compiled, n: usize) -> Result<(), Diagnostic> {
    if let Some(t) = c.ast.train.as_ref()
        && t.validation.is_some_and(|v| v > 0.0)
        && n < 2
    {
        return Err(Diagnostic::error(format!(
            "a validation split needs at least 2 samples, and the data has {n}"
        ))
        .label(t.validation_span, "no sample would be left for training or for validation"));
    }
    Ok(())
}
