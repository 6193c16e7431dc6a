//! The library API is sound: `Program::compile` and `run` are safe functions, so no graph and no
//! input may make generated code touch memory outside its arena, and compiled code is freed.
//! Graphs here are built through the public API, as a user of the crate would.

use aec::codegen::{Options, Program, RunError};
use aec::ir::{Graph, Op, ParamDef, ParamRole, Type};
use aec::value::Buf;

fn param(g: &mut Graph, name: &str, shape: &[usize]) -> aec::ir::NodeId {
    let def =
        ParamDef { name: name.into(), shape: shape.to_vec(), role: ParamRole::Weight, fan_in: 1, fan_out: 1 };
    g.add_param(def).unwrap()
}

fn compile(g: &Graph) -> Result<Program, String> {
    Program::compile(g, Options::default())
}

/// Input ids reshaped, then looked up in a table: bounded through the reshape by a run-time
/// check; an id past the table stops the step before any kernel runs.
#[test]
fn ids_through_a_reshape_into_an_embedding_are_checked_at_run_time() {
    let mut g = Graph::new("embed");
    let ids = g.add_input("ids", Type::i32([2, 3])).unwrap();
    let flat = g.add(Op::Reshape { x: ids, shape: vec![6, 1] }, None).unwrap();
    let table = param(&mut g, "table", &[5, 4]);
    let out = g.add(Op::Embed { table, ids: flat }, None).unwrap();
    g.outputs.push(("out".into(), out));
    let mut p = compile(&g).unwrap();
    assert_eq!(p.run(&[Buf::I32(vec![0, 1, 2, 3, 4, 4])], 0, 1), Ok(()));
    for bad in [5, -1, i32::MAX, i32::MIN] {
        let err = p.run(&[Buf::I32(vec![0, 1, bad, 3, 4, 4])], 0, 1).unwrap_err();
        assert_eq!(err, RunError::Inputs(format!("`ids` holds the id {bad}, outside 0..5")));
    }
}

/// Switches that come from an input (not a pool) into gather and scatter: bounded by the plane
/// they index, checked when the step runs.
#[test]
fn switches_from_an_input_are_bounded_by_the_plane() {
    let mut g = Graph::new("switches");
    let x = g.add_input("x", Type::f32([1, 2, 3, 3])).unwrap();
    let idx = g.add_input("idx", Type::i32([1, 2, 1, 2])).unwrap();
    let v = g.add(Op::Gather { x, idx }, None).unwrap();
    let back = g.add(Op::Scatter { v, idx, height: 2, width: 2, accumulate: true }, None).unwrap();
    g.outputs.push(("back".into(), back));
    let mut p = compile(&g).unwrap();
    let x_in = Buf::F32((0..18).map(|i| i as f32).collect());
    // Gather indexes a 3×3 plane, scatter a 2×2 one: ids must be below 4.
    assert_eq!(p.run(&[x_in.clone(), Buf::I32(vec![0, 3, 1, 2])], 0, 1), Ok(()));
    let err = p.run(&[x_in, Buf::I32(vec![0, 4, 1, 2])], 0, 1).unwrap_err();
    assert_eq!(err, RunError::Inputs("`idx` holds the id 4, outside 0..4".into()));
}

/// A pool's switches index its own plane; used on a smaller plane they would write past it,
/// and the graph gets no code.
#[test]
fn switches_of_a_larger_plane_are_refused() {
    let mut g = Graph::new("unpool");
    let x = g.add_input("x", Type::f32([1, 1, 4, 4])).unwrap();
    let idx = g.add(Op::PoolArgmax { x, kernel: [2, 2], stride: [2, 2] }, None).unwrap();
    let v = g.add(Op::Gather { x, idx }, None).unwrap();
    let up = g.add(Op::Scatter { v, idx, height: 3, width: 3, accumulate: false }, None).unwrap();
    g.outputs.push(("up".into(), up));
    let err = compile(&g).err().unwrap();
    assert!(err.contains("scatter indexes 0..9") && err.contains("values reach 15"), "{err}");
}

/// Teacher forcing's start id is an index too.
#[test]
fn a_start_id_outside_the_table_is_refused() {
    let mut g = Graph::new("shift");
    let ids = g.add_input("ids", Type::i32([2, 3])).unwrap();
    let shifted = g.add(Op::ShiftRight { ids, start: 7 }, None).unwrap();
    let table = param(&mut g, "table", &[5, 4]);
    let out = g.add(Op::Embed { table, ids: shifted }, None).unwrap();
    g.outputs.push(("out".into(), out));
    let err = compile(&g).err().unwrap();
    assert!(err.contains("start id 7 is outside it"), "{err}");
}

/// A graph whose definitions were changed after its nodes were added no longer verifies, and
/// gets no code.
#[test]
fn a_graph_that_does_not_verify_is_refused() {
    let mut g = Graph::new("changed");
    let ids = g.add_input("ids", Type::i32([6])).unwrap();
    let table = param(&mut g, "table", &[5, 4]);
    let out = g.add(Op::Embed { table, ids }, None).unwrap();
    g.outputs.push(("out".into(), out));
    g.inputs[0].ty = Type::i32([600]);
    let err = compile(&g).err().unwrap();
    assert!(err.contains("cannot be compiled"), "{err}");
}

/// Every input must be given: a missing one would run on the previous step's values.
#[test]
fn a_missing_input_is_an_error() {
    let mut g = Graph::new("two");
    let a = g.add_input("a", Type::f32([4])).unwrap();
    let b = g.add_input("b", Type::f32([4])).unwrap();
    let sum = g.add(Op::Binary { f: aec::ir::BinaryFn::Add, a, b }, None).unwrap();
    g.outputs.push(("sum".into(), sum));
    let mut p = compile(&g).unwrap();
    let four = Buf::F32(vec![1.0; 4]);
    assert_eq!(p.run(&[four.clone(), four.clone()], 0, 1), Ok(()));
    let err = p.run(&[four], 0, 1).unwrap_err();
    assert_eq!(err, RunError::Inputs("`two` takes 2 inputs (`a`, `b`), got 1 (`b` is missing)".into()));
}

/// Resident memory of this process, in bytes.
fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// Compiled code is freed with its program: a thousand compilations of a training step take
/// bounded memory.
#[test]
fn a_thousand_programs_take_bounded_memory() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/specs/onehot838.ae")).unwrap();
    let compiled = aec::compile(&src, &aec::Config::default()).unwrap();
    let step = aec::training_step(&compiled).unwrap();
    let warm = |n: usize| {
        for _ in 0..n {
            let mut p = compile(&step).unwrap();
            p.run(&[Buf::F32(vec![0.5; 64])], 0, 1).unwrap();
        }
    };
    warm(50);
    let before = resident();
    warm(1000);
    let grown = resident().saturating_sub(before);
    assert!(grown < 8 << 20, "1000 programs grew resident memory by {} KiB", grown >> 10);
}
