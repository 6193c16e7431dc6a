//! The native matmul alone (`cargo bench --bench matmul`): C = A·B for square n×n matrices on
//! one thread, on the wide core (where this CPU has one) and on Cranelift's 128-bit kernel.
//! Before criterion's figures it prints, from the same run, the register-only FMA peak of each
//! vector width (measured now) and each path's GFLOP/s at n = 64, 256 and 1024 with its share of
//! the peak of the width it runs at.

use aec::codegen::wide::{self, MatmulPath};
use aec::codegen::{Options, Program};
use aec::interp::Buf;
use aec::ir::{Graph, Op, Type};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::time::Instant;

fn program(n: usize, matmul: MatmulPath) -> (Program, [Buf; 2]) {
    let mut g = Graph::new("matmul");
    let a = g.add_input("a", Type::f32([n, n])).expect("input");
    let b = g.add_input("b", Type::f32([n, n])).expect("input");
    let y = g.add(Op::MatMul { a, b, ta: false, tb: false }, None).expect("matmul");
    g.outputs.push(("y".into(), y));
    let p = Program::compile(&g, Options { matmul, ..Options::default() }).expect("compiles");
    let x = Buf::F32((0..n * n).map(|i| (i % 13) as f32 * 0.1).collect());
    (p, [x.clone(), x])
}

fn paths() -> Vec<(MatmulPath, &'static str)> {
    let mut out = vec![(MatmulPath::Cranelift, "cranelift")];
    if wide::isa().is_some() {
        out.push((MatmulPath::Auto, "wide"));
    }
    out
}

/// GFLOP/s of each path and size (the median of 21 timed runs) against the measured peaks.
fn report() {
    let peaks = wide::fma_peaks();
    for (width, gflops) in &peaks {
        println!("register-only {width} FMA peak: {gflops:.1} GFLOP/s per core");
    }
    for (path, label) in paths() {
        let width = match path {
            MatmulPath::Auto | MatmulPath::Gemm => peaks.first(),
            MatmulPath::Cranelift => peaks.iter().find(|p| p.0 == "128-bit"),
        };
        for n in [64usize, 256, 1024] {
            let (mut p, inputs) = program(n, path);
            let mut times: Vec<f64> = (0..21)
                .map(|_| {
                    let t = Instant::now();
                    let _ = p.run(&inputs, 0, 1);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let rate = 2.0 * (n * n * n) as f64 / times[10] / 1e9;
            let share = width
                .map_or(String::new(), |(w, peak)| format!(", {:.0}% of the {w} peak", 100.0 * rate / peak));
            println!("matmul/{label}/{n}: {rate:.1} GFLOP/s{share}");
        }
    }
}

fn matmul(c: &mut Criterion) {
    report();
    let mut group = c.benchmark_group("matmul");
    for (path, label) in paths() {
        for n in [64usize, 256, 1024] {
            let (mut p, inputs) = program(n, path);
            group.throughput(Throughput::Elements((2 * n * n * n) as u64));
            group.sample_size(if n >= 1024 { 10 } else { 50 });
            group.bench_function(format!("{label}/{n}"), |bench| bench.iter(|| p.run(&inputs, 0, 1).is_ok()));
        }
    }
    group.finish();
}

criterion_group!(benches, matmul);
criterion_main!(benches);
