//! Front-end speed: parse, check and lower each shipped spec (`cargo bench --bench compile`).

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::path::PathBuf;

fn specs() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("specs");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("specs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "ae"))
        .map(|p| {
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            (name, std::fs::read_to_string(&p).expect("readable spec"))
        })
        .collect();
    out.sort();
    out
}

fn compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    for (name, src) in specs() {
        group.bench_function(&name, |b| {
            b.iter(|| aec::compile(black_box(&src), &aec::Config::default()).is_ok())
        });
    }
    group.finish();
}

criterion_group!(benches, compile);
criterion_main!(benches);
