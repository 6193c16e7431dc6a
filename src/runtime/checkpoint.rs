//! Checkpoints as safetensors, written atomically.
//!
//! - `checkpoint.safetensors`: the parameters under PyTorch's state-dict names and layouts, so
//!   `module.load_state_dict(load_file(path), strict=True)` loads them into the equivalent torch
//!   module. A tied weight is stored once, under its encoder name.
//! - `optimizer.safetensors`: per parameter `<name>.momentum_buffer` (SGD) or `<name>.exp_avg`
//!   and `<name>.exp_avg_sq` (Adam), with metadata: `epoch`, `step`, the per-parameter update
//!   counts and the seed — everything `--resume` needs.
//!
//! Every file is written to a temporary name beside its target, synced, then renamed over it:
//! a crash leaves the old file or the new one, never half of one.

use super::State;
use crate::ir::Graph;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// A named f32 tensor: name, shape, values.
pub type Named = (String, Vec<usize>, Vec<f32>);

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Where training stands, saved beside the parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub epoch: u64,
    pub seed: u64,
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
    safetensors::serialize(views?, meta).map_err(|e| e.to_string())
}

/// Saves a run folder: `params` (every named tensor the run keeps: the model's parameters, and
/// during greedy pretraining its stage decoders) and the optimizer state of `g`, the graph being
/// trained, whose parameters are among `params`.
pub fn save(
    dir: &Path,
    params: &[Named],
    g: &Graph,
    state: &State,
    progress: &Progress,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        params.iter().map(|(n, shape, v)| (n.clone(), shape.clone(), to_bytes(v))).collect();
    let bytes = serialize(&tensors, None)?;
    let path = dir.join("checkpoint.safetensors");
    write_atomic(&path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;

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
    let meta = HashMap::from([
        ("epoch".to_owned(), progress.epoch.to_string()),
        ("step".to_owned(), state.step.to_string()),
        ("seed".to_owned(), progress.seed.to_string()),
        ("param_steps".to_owned(), steps.join(",")),
        ("graph".to_owned(), g.name.clone()),
    ]);
    let bytes = serialize(&slots, Some(meta))?;
    let path = dir.join("optimizer.safetensors");
    write_atomic(&path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
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
    let mut out = Vec::new();
    for p in &g.params {
        let t = st.tensor(&p.name).map_err(|_| {
            format!("{} has no `{}` (shape {:?}), which the spec needs", path.display(), p.name, p.shape)
        })?;
        if t.shape() != p.shape.as_slice() {
            return Err(format!(
                "{}: `{}` has shape {:?}, the spec needs {:?}",
                path.display(),
                p.name,
                t.shape(),
                p.shape
            ));
        }
        out.push(f32s(path, &p.name, &t)?);
    }
    let known: Vec<&str> = g.params.iter().map(|p| p.name.as_str()).collect();
    let mut extra: Vec<String> =
        st.names().into_iter().filter(|n| !known.contains(n)).map(str::to_owned).collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(format!("{} has `{name}`, which the spec does not declare", path.display()));
    }
    Ok(out)
}

fn f32s(path: &Path, name: &str, t: &TensorView<'_>) -> Result<Vec<f32>, String> {
    if t.dtype() != Dtype::F32 {
        return Err(format!("{}: `{name}` is {:?}, aec reads F32", path.display(), t.dtype()));
    }
    let v: Vec<f32> =
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
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
        state.param_steps = steps;
        for (i, p) in g.params.iter().enumerate() {
            for suffix in ["momentum_buffer", "exp_avg", "exp_avg_sq"] {
                if let Ok(t) = st.tensor(&format!("{}.{suffix}", p.name)) {
                    state.slots[i].push(f32s(&path, &p.name, &t)?);
                }
            }
        }
    }
    Ok((state, Progress { epoch: num("epoch")?, seed: num("seed")? }))
}
