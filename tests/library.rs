//! The library as the Python package drives it: a run configured from a spec with overrides,
//! the spec's data or arrays given in memory, and a run interrupted from outside.

use aec::data::{Array, Dataset};
use aec::runtime::config::Overrides;
use aec::runtime::dataset;
use aec::runtime::train::{self, Event, TrainConfig};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn digits() -> aec::Compiled {
    let src = std::fs::read_to_string("specs/digits_mlp.ae").unwrap();
    aec::compile(&src, &aec::Config::default()).unwrap()
}

fn config(c: &aec::Compiled, out: &Path, epochs: u64, stop_at: Option<u64>) -> TrainConfig {
    let o = Overrides {
        epochs: Some(epochs),
        threads: 1,
        out: out.to_owned(),
        stop_at,
        beam: (1, 0.6),
        ..Default::default()
    };
    TrainConfig::of(c, o).unwrap()
}

fn spec_data(c: &aec::Compiled) -> Dataset {
    dataset::load(c, Path::new("specs"), 1).unwrap().data
}

#[test]
fn an_interrupted_run_keeps_the_last_finished_epoch_and_its_save() {
    let c = digits();
    let data = spec_data(&c);
    let dir = std::env::temp_dir().join(format!("aec-interrupt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let flag = Arc::new(AtomicBool::new(false));
    let cfg = TrainConfig { interrupt: Some(flag.clone()), ..config(&c, &dir.join("cut"), 5, None) };
    let mut on = |e: Event| {
        if let Event::Step { epoch: 2, step_in_epoch: 3, .. } = e {
            flag.store(true, Ordering::Relaxed);
        }
    };
    let cut = train::train(&c, &data, &cfg, &mut on).unwrap();
    assert!(cut.interrupted);
    assert_eq!(cut.metrics.len(), 1, "only the finished epoch is reported");
    // The first epoch ended less than 2 s after the start: its save waited, so the folder
    // has none, and says so.
    assert_eq!(cut.saved_epoch, None);
    // Its parameters are those of a run that stopped after epoch 1, bit for bit.
    let one = train::train(&c, &data, &config(&c, &dir.join("one"), 5, Some(1)), &mut |_| {}).unwrap();
    assert!(!one.interrupted);
    assert_eq!(one.saved_epoch, Some(1));
    assert_eq!(cut.params, one.params);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn arrays_in_memory_train_as_the_spec_data_does() {
    let c = digits();
    let data = spec_data(&c);
    let x = Array {
        shape: vec![data.n, 8, 8],
        values: data.gather(0, &(0..data.n).collect::<Vec<_>>()).unwrap(),
    };
    let given = dataset::from_arrays(&c, vec![x.clone()], &|_| "x".into()).unwrap();
    let dir = std::env::temp_dir().join(format!("aec-arrays-{}", std::process::id()));
    let a = train::train(&c, &data, &config(&c, &dir.join("a"), 2, None), &mut |_| {}).unwrap();
    let b = train::train(&c, &given, &config(&c, &dir.join("b"), 2, None), &mut |_| {}).unwrap();
    assert_eq!(a.params, b.params);
    // Starting values given in memory are where training starts.
    let cfg =
        TrainConfig { init_values: Some(Arc::new(a.params.clone())), ..config(&c, &dir.join("c"), 1, None) };
    let more = train::train(&c, &given, &cfg, &mut |_| {}).unwrap();
    assert!(more.metrics[0].train_loss < a.metrics[0].train_loss);
    // Wrong arrays are refused with what was expected.
    let err = dataset::from_arrays(&c, vec![x.clone(), x], &|_| "x".into()).err().unwrap();
    assert!(err.contains("takes 1 array (`x`), given 2"), "{err}");
    let flat = Array { shape: vec![10, 63], values: aec::data::Values::F32(vec![0.0; 630]) };
    let err = dataset::from_arrays(&c, vec![flat], &|_| "the array for `x`".into()).err().unwrap();
    assert!(err.contains("declared [8, 8]"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn overrides_out_of_range_are_refused() {
    let c = digits();
    let o = |lr, validation| Overrides { lr, validation, threads: 1, ..Default::default() };
    assert!(TrainConfig::of(&c, o(Some(-1.0), None)).err().unwrap().contains("positive"));
    assert!(TrainConfig::of(&c, o(None, Some(1.0))).err().unwrap().contains("below 1"));
    let cfg = TrainConfig::of(&c, o(Some(0.01), Some(0.2))).unwrap();
    assert_eq!((cfg.base_lr, cfg.validation, cfg.batch, cfg.seed), (0.01, 0.2, 64, 1));
}
