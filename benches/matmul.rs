//! The native matmul kernel alone (`cargo bench --bench matmul`): C = A·B for square n×n
//! matrices, one thread, and its share of the 128-bit FMA peak (≈45 GFLOP/s per core here).

use aec::codegen::{Options, Program};
use aec::interp::Buf;
use aec::ir::{Graph, Op, Type};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul");
    for n in [64usize, 256, 1024] {
        let mut g = Graph::new("matmul");
        let a = g.add_input("a", Type::f32([n, n])).expect("input");
        let b = g.add_input("b", Type::f32([n, n])).expect("input");
        let y = g.add(Op::MatMul { a, b, ta: false, tb: false }, None).expect("matmul");
        g.outputs.push(("y".into(), y));
        let mut p = Program::compile(&g, Options::default()).expect("compiles");
        let x = Buf::F32((0..n * n).map(|i| (i % 13) as f32 * 0.1).collect());
        let inputs = [x.clone(), x];
        group.throughput(Throughput::Elements((2 * n * n * n) as u64));
        group.sample_size(if n >= 1024 { 10 } else { 50 });
        group.bench_function(format!("{n}"), |bench| bench.iter(|| p.run(&inputs, 0, 1).is_ok()));
    }
    group.finish();
}

criterion_group!(benches, matmul);
criterion_main!(benches);
