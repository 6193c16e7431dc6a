//! Checkpoints as safetensors, written atomically.
//!
//! - `checkpoint.safetensors`: the parameters under PyTorch's state-dict names and layouts, so
//!   `module.load_state_dict(load_file(path), strict=True)` loads them into the equivalent torch
//!   module. A tied weight is stored once, under its encoder name.
//! - `optimizer.safetensors`: per parameter `<name>.momentum_buffer` (SGD) or `<name>.exp_avg`
//!   and `<name>.exp_avg_sq` (Adam), with metadata: `epoch`, `step`, the per-parameter update
//!   counts and the seed — everything `--resume` needs.
//!
//! A save is one transaction ([`commit`]): the checkpoint, the optimizer state and the metrics
//! are written under staged names and synced, then `save.json` — a manifest naming each file
//! with its length and hash — is renamed into place (the commit point), and only then are the
//! staged files renamed over the old ones. A kill or a full disk before the commit leaves the
//! previous save whole; after it, [`recover`] finishes the renames from the manifest. Every
//! byte written is a function of the run (safetensors headers are written with sorted keys).

use super::State;
use crate::files::{fault, sync_dir, write_atomic, write_synced};
use crate::ir::Graph;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A named f32 tensor: name, shape, values.
pub type Named = (String, Vec<usize>, Vec<f32>);

/// The manifest of the last committed save.
pub const MANIFEST: &str = "save.json";

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Manifest {
    step: u64,
    files: Vec<FileEntry>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct FileEntry {
    name: String,
    bytes: u64,
    fnv1a64: String,
    /// Where the file is staged until the commit's renames.
    staged: String,
}

/// FNV-1a, 64 bits: a checksum of a saved file (not a defence against tampering).
fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Saves `files` (name, bytes) into `dir` as one transaction, tagged with the training `step`:
/// staged and synced, committed by renaming the manifest into place, then moved over the
/// previous save's files. On an error before the commit the previous save stays whole.
pub fn commit(dir: &Path, files: &[(&str, Vec<u8>)], step: u64) -> Result<(), String> {
    let err = |what: &str, path: &Path, e: std::io::Error| format!("cannot {what} {}: {e}", path.display());
    std::fs::create_dir_all(dir).map_err(|e| err("create", dir, e))?;
    let mut entries = Vec::new();
    let staged: Vec<PathBuf> =
        files.iter().map(|(name, _)| dir.join(format!(".{name}.s{step}.new"))).collect();
    let result = (|| {
        for ((name, bytes), path) in files.iter().zip(&staged) {
            write_synced(path, bytes).map_err(|e| err("write", path, e))?;
            entries.push(FileEntry {
                name: (*name).to_owned(),
                bytes: bytes.len() as u64,
                fnv1a64: fnv1a64(bytes),
                staged: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            });
        }
        let manifest = Manifest { step, files: entries };
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())?;
        let path = dir.join(MANIFEST);
        write_atomic(&path, text.as_bytes()).map_err(|e| err("write", &path, e))
    })();
    if let Err(e) = result {
        for path in &staged {
            let _ = std::fs::remove_file(path);
        }
        return Err(e);
    }
    // Committed: what is left is the renames (which `recover` redoes after a crash) and the
    // leftovers of earlier interrupted saves.
    for ((name, _), staged) in files.iter().zip(&staged) {
        let target = dir.join(name);
        fault()
            .and_then(|()| std::fs::rename(staged, &target))
            .map_err(|e| err("move into place", staged, e))?;
    }
    sync_dir(&dir.join(MANIFEST)).map_err(|e| err("sync", dir, e))?;
    remove_leftovers(dir);
    Ok(())
}

/// Removes staged files and temporaries that interrupted saves left behind.
fn remove_leftovers(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && (name.ends_with(".new") || name.ends_with(".tmp")) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Brings `dir` to its last committed save: finishes the renames of a save that was committed
/// but not moved into place, checks every file the manifest names (length and hash), and
/// removes leftover staged and temporary files. `Ok(false)` when the folder has no manifest (a
/// run from before manifests, or none saved yet).
pub fn recover(dir: &Path) -> Result<bool, String> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| format!("{} is not a save manifest: {e}", path.display()))?;
    let matches = |p: &Path, f: &FileEntry| {
        std::fs::read(p).is_ok_and(|b| b.len() as u64 == f.bytes && fnv1a64(&b) == f.fnv1a64)
    };
    let mut moved = false;
    for f in &manifest.files {
        let target = dir.join(&f.name);
        if matches(&target, f) {
            continue;
        }
        let staged = dir.join(&f.staged);
        if !matches(&staged, f) {
            return Err(format!(
                "the save in {} is damaged: {} is missing or differs from what {MANIFEST} records (step {}); restore the folder from a copy, or start the run again (from edited weights: `aec run SPEC --train --init FILE`)",
                dir.display(),
                f.name,
                manifest.step
            ));
        }
        fault()
            .and_then(|()| std::fs::rename(&staged, &target))
            .map_err(|e| format!("cannot move {} into place: {e}", staged.display()))?;
        moved = true;
    }
    if moved {
        sync_dir(&path).map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
    }
    remove_leftovers(dir);
    Ok(true)
}

/// Where training stands, saved beside the parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub epoch: u64,
    pub seed: u64,
    /// Early stopping's state, when the run has it.
    pub early: Option<EarlyState>,
    /// The plateau schedule's state, when the run has it.
    pub plateau: Option<super::schedule::PlateauState>,
}

/// Where early stopping stands: the best validation loss, its epoch, and the epochs since.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EarlyState {
    pub best: f64,
    pub best_epoch: u64,
    pub wait: u64,
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn serialize(
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    meta: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, String> {
    let views: Result<Vec<(String, TensorView<'_>)>, String> = tensors
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)).map_err(|e| e.to_string())
        })
        .collect();
    let bytes = safetensors::serialize(views?, meta).map_err(|e| e.to_string())?;
    Ok(sorted_header(bytes))
}

/// The same safetensors file with its JSON header's keys sorted (the metadata is a `HashMap`,
/// whose order changes from run to run). The header keeps its length: the same entries,
/// reordered, padded with the same spaces; tensors are located by their offsets, not order.
fn sorted_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let Some(len) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
    else {
        return bytes;
    };
    let Some(header) = bytes.get(8..8 + len) else { return bytes };
    // serde_json's maps are sorted by key.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(header) else { return bytes };
    let Ok(text) = serde_json::to_string(&value) else { return bytes };
    if text.len() <= len {
        let mut sorted = text.into_bytes();
        sorted.resize(len, b' ');
        bytes[8..8 + len].copy_from_slice(&sorted);
    }
    bytes
}

/// The files of a save of a run folder: `checkpoint.safetensors` with `params` (every named
/// tensor the run keeps: the model's parameters, and during greedy pretraining its stage
/// decoders) and `optimizer.safetensors` with the optimizer state of `g`, the graph being
/// trained, whose parameters are among `params`. [`commit`] writes them.
pub fn save_files(
    params: &[Named],
    g: &Graph,
    state: &State,
    progress: &Progress,
) -> Result<Vec<(&'static str, Vec<u8>)>, String> {
    let checkpoint = weights_file(params)?;

    let mut slots = Vec::new();
    for (p, s) in g.params.iter().zip(&state.slots) {
        let names: &[&str] = match s.len() {
            1 => &["momentum_buffer"],
            2 => &["exp_avg", "exp_avg_sq"],
            _ => &[],
        };
        for (suffix, buf) in names.iter().zip(s) {
            slots.push((format!("{}.{suffix}", p.name), p.shape.clone(), to_bytes(buf)));
        }
    }
    let steps: Vec<String> = state.param_steps.iter().map(u64::to_string).collect();
    let mut meta = HashMap::from([
        ("epoch".to_owned(), progress.epoch.to_string()),
        ("step".to_owned(), state.step.to_string()),
        ("seed".to_owned(), progress.seed.to_string()),
        ("param_steps".to_owned(), steps.join(",")),
        ("graph".to_owned(), g.name.clone()),
    ]);
    if let Some(e) = progress.early {
        // f64's shortest round-trip text: the same bits after a resume.
        meta.insert("early_stop".to_owned(), serde_json::to_string(&e).map_err(|e| e.to_string())?);
    }
    if let Some(p) = progress.plateau {
        meta.insert("plateau".to_owned(), serde_json::to_string(&p).map_err(|e| e.to_string())?);
    }
    let optimizer = serialize(&slots, Some(meta))?;
    Ok(vec![("checkpoint.safetensors", checkpoint), ("optimizer.safetensors", optimizer)])
}

/// A weights file (`best.safetensors`): the named tensors alone, as `checkpoint.safetensors`.
pub fn weights_file(params: &[Named]) -> Result<Vec<u8>, String> {
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        params.iter().map(|(n, shape, v)| (n.clone(), shape.clone(), to_bytes(v))).collect();
    serialize(&tensors, None)
}

/// Every f32 tensor of a safetensors file, in the file's order.
pub fn read_all(path: &Path) -> Result<Vec<Named>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{} is not a safetensors file: {e}", path.display()))?;
    let mut out = Vec::new();
    for (name, t) in st.iter() {
        out.push((name.to_owned(), t.shape().to_vec(), f32s(path, name, &t)?));
    }
    Ok(out)
}

/// Reads the parameters of `g` from a checkpoint: every name present with its shape, nothing
/// missing, nothing extra.
pub fn load_params(path: &Path, g: &Graph) -> Result<Vec<Vec<f32>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{} is not a safetensors file: {e}", path.display()))?;
    // A save made inside greedy pretraining (`--stop-at` in a stage) holds the stage's own
    // decoder, and the model's decoder is not trained yet.
    // (It keeps the decoders of the stages before it too: the stage is the last one.)
    let stage = st
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("pretrain.")?.split('.').next()?.parse::<usize>().ok())
        .max();
    if let Some(stage) = stage {
        return Err(format!(
            "{} was saved during stage {stage} of greedy pretraining: it holds that stage's own \
             decoder (`pretrain.{stage}.*`), not the model's, which is not trained yet. Finish the \
             run (`aec run SPEC --train --resume DIR`) and use the checkpoint it ends with",
            path.display()
        ));
    }
    // Every problem at once: what is missing, what has another shape, what is extra.
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for p in &g.params {
        match st.tensor(&p.name) {
            Err(_) => problems.push(format!("no `{}` (shape {:?}), which the spec needs", p.name, p.shape)),
            Ok(t) if t.shape() != p.shape.as_slice() => {
                problems.push(format!("`{}` has shape {:?}, the spec needs {:?}", p.name, t.shape(), p.shape))
            }
            Ok(t) => out.push(f32s(path, &p.name, &t)?),
        }
    }
    let known: Vec<&str> = g.params.iter().map(|p| p.name.as_str()).collect();
    let mut extra: Vec<String> =
        st.names().into_iter().filter(|n| !known.contains(n)).map(str::to_owned).collect();
    extra.sort();
    problems.extend(extra.iter().map(|name| format!("`{name}`, which the spec does not declare")));
    match problems.as_slice() {
        [] => Ok(out),
        [one] => Err(format!("{}: {one}", path.display())),
        many => {
            let shown: Vec<String> = many.iter().take(12).map(|p| format!("\n  - {p}")).collect();
            let more = many.len().saturating_sub(12);
            let more = if more > 0 { format!("\n  - and {more} more") } else { String::new() };
            Err(format!(
                "{} does not fit the spec ({} problems):{}{more}",
                path.display(),
                many.len(),
                shown.concat()
            ))
        }
    }
}

fn f32s(path: &Path, name: &str, t: &TensorView<'_>) -> Result<Vec<f32>, String> {
    let bytes8 = |c: &[u8]| <[u8; 8]>::try_from(c).unwrap_or([0; 8]);
    let v: Vec<f32> = match t.dtype() {
        Dtype::F32 => {
            t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        Dtype::F64 => t.data().chunks_exact(8).map(|c| f64::from_le_bytes(bytes8(c)) as f32).collect(),
        Dtype::I64 => t.data().chunks_exact(8).map(|c| i64::from_le_bytes(bytes8(c)) as f32).collect(),
        other => {
            return Err(format!("{}: `{name}` is {other:?}; aec reads F32 (and F64, I64)", path.display()));
        }
    };
    // Non-finite weights give all-NaN outputs (or a run that diverges at once): refuse them.
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(format!(
            "{}: `{name}` holds {} at element {i} (of {}); weights must be finite numbers",
            path.display(),
            v[i],
            v.len()
        ));
    }
    Ok(v)
}

/// The optimizer state for `g` saved in `dir` (parameter values are not filled in: they come from
/// the checkpoint by name), and where the run stood.
pub fn load_optimizer(dir: &Path, g: &Graph) -> Result<(State, Progress), String> {
    let path = dir.join("optimizer.safetensors");
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| format!("{} is not a safetensors file: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let info = meta.metadata().clone().unwrap_or_default();
    let num = |k: &str| -> Result<u64, String> {
        info.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{} lacks `{k}` in its metadata", path.display()))
    };
    let mut state = State::new(vec![Vec::new(); g.params.len()]);
    state.step = num("step")?;
    let steps: Vec<u64> = info
        .get("param_steps")
        .map(|s| s.split(',').filter(|x| !x.is_empty()).filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    if info.get("graph") == Some(&g.name) {
        if steps.len() != g.params.len() {
            return Err(format!("{}: its per-parameter steps do not match the spec", path.display()));
        }
        let slots = g.optimizer_slots();
        for (i, p) in g.params.iter().enumerate() {
            // A parameter that has been updated has every buffer its optimizer keeps, each of
            // its shape: a missing or misshapen one is an error, never zeros.
            let names: &[&str] = match slots[i].unwrap_or(0) {
                2 => &["exp_avg", "exp_avg_sq"],
                1 => &["momentum_buffer"],
                _ => &[],
            };
            for suffix in names {
                let name = format!("{}.{suffix}", p.name);
                match st.tensor(&name) {
                    Ok(t) if t.shape() == p.shape.as_slice() => state.slots[i].push(f32s(&path, &name, &t)?),
                    Ok(t) => {
                        return Err(format!(
                            "{}: `{name}` has shape {:?}, the spec needs {:?}",
                            path.display(),
                            t.shape(),
                            p.shape
                        ));
                    }
                    Err(_) if steps[i] > 0 => {
                        return Err(format!(
                            "{} has no `{name}`, which `{}` needs after {} updates",
                            path.display(),
                            p.name,
                            steps[i]
                        ));
                    }
                    Err(_) => {}
                }
            }
        }
        state.param_steps = steps;
    }
    let early = match info.get("early_stop") {
        Some(text) => Some(
            serde_json::from_str(text)
                .map_err(|e| format!("{}: its early-stopping state is damaged: {e}", path.display()))?,
        ),
        None => None,
    };
    let plateau = match info.get("plateau") {
        Some(text) => Some(serde_json::from_str(text).map_err(|e| {
            format!("{}: its learning-rate schedule's state is damaged: {e}", path.display())
        })?),
        None => None,
    };
    Ok((state, Progress { epoch: num("epoch")?, seed: num("seed")?, early, plateau }))
}
