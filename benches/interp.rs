//! One training step on the reference interpreter (`cargo bench --bench interp`): the
//! interpreter is the oracle, not the fast path, but its speed bounds how long tests take.

use aec::interp::{self, Buf};
use aec::runtime::{State, init};
use criterion::{Criterion, criterion_group, criterion_main};
use std::path::PathBuf;

fn step(c: &mut Criterion) {
    let mut group = c.benchmark_group("interp_train_step");
    for name in ["onehot838", "digits_mlp", "digits_conv"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("specs").join(format!("{name}.ae"));
        let src = std::fs::read_to_string(path).expect("spec");
        let compiled = aec::compile(&src, &aec::Config::default()).expect("compiles");
        let g = aec::training_step(&compiled).expect("differentiates");
        let mut state = State::new(init::init_params(&compiled.forward, aec::syntax::ast::Init::Default, 1));
        let inputs: Vec<Buf> = g.inputs.iter().map(|i| Buf::F32(vec![0.5; i.ty.numel()])).collect();
        let opts = interp::Options { threads: 1, ..interp::Options::default() };
        group.bench_function(format!("{name}_batch{}", compiled.batch), |b| {
            b.iter(|| {
                state.step += 1;
                interp::run(&g, &inputs, &mut state, &opts).is_ok()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
