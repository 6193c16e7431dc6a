//! Helpers for writing kernels with Cranelift's `FunctionBuilder`: addresses at constant offsets
//! from the arena base, counted loops with constant bounds, and the math Cranelift has no
//! instruction for (a vectorisable `exp` in the style of Cephes' `expf`).

use crate::ir::{BinaryFn, UnaryFn};
use cranelift_codegen::cursor::{Cursor, FuncCursor};
use cranelift_codegen::ir::Endianness;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64};
use cranelift_codegen::ir::{
    BlockArg, FuncRef, InstBuilder, InstructionData, MemFlagsData, Opcode, Type, Value, ValueDef,
};
use cranelift_frontend::{FuncInstBuilder, FunctionBuilder};

pub struct Emit<'a, 'b> {
    pub b: &'a mut FunctionBuilder<'b>,
    pub base: Value,
    /// `logf` from the host's libm, for the scalar logarithms of the losses.
    pub logf: Option<FuncRef>,
    /// `rng::normal` (a draw from N(0, 1) of the counter-based generator), for `Op::Normal`.
    pub normal: Option<FuncRef>,
    /// The full-width elementwise primitives, where the machine and the path allow them.
    pub wide: Option<Primitives>,
    /// Set once the kernel calls a full-width primitive: it runs at 256 bits.
    pub full_width: bool,
    /// What the kernel's primitive calls point at, for the program to keep while its code
    /// lives; boxed, so that their addresses hold while the vector grows.
    #[allow(clippy::vec_box)]
    pub held: Vec<Box<super::elementwise::ChainCall>>,
    /// The kernel's integer constants, each defined once at the top of the entry block (start
    /// empty). Cranelift rematerialises a constant in each block that uses it, so sharing one
    /// value costs no register; it spares Cranelift's e-graph pass the copies it would merge.
    pub consts: std::collections::HashMap<(Type, i64), Value>,
}

/// The full-width elementwise primitives (`elementwise`) as a kernel imports them.
#[derive(Clone, Copy)]
pub struct Primitives {
    /// `aec_sum_exp(base, src, dst, n, max) -> Σ`: a row's exponentials.
    pub sum_exp: FuncRef,
    /// `aec_chain(base, call, unit)`: a unit of a fused elementwise chain.
    pub chain: FuncRef,
}

impl Emit<'_, '_> {
    /// Keeps `call` for the program and returns the address its primitive takes.
    pub fn hold(&mut self, call: super::elementwise::ChainCall) -> Value {
        let call = Box::new(call);
        let addr = call.as_ref() as *const super::elementwise::ChainCall as i64;
        self.held.push(call);
        self.full_width = true;
        self.i64(addr)
    }
}

/// Loads and stores of arena memory: aligned for scalars, trusted (no traps; the plan checked
/// every bound before the first call).
pub fn mem() -> MemFlagsData {
    MemFlagsData::trusted()
}

/// Vector loads and stores: `notrap`, not aligned (a row may start anywhere in a buffer).
pub fn vmem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

impl Emit<'_, '_> {
    pub fn i64(&mut self, v: i64) -> Value {
        self.iconst(I64, v)
    }

    /// The integer constant `v` of type `ty` (a scalar integer type; `v` sign-extended, kept to
    /// the type's width as Cranelift's `_imm_s` builders do): the kernel's one value for it.
    pub fn iconst(&mut self, ty: Type, v: i64) -> Value {
        let v = if ty.bits() < 64 { v & ((1i64 << ty.bits()) - 1) } else { v };
        if let Some(&c) = self.consts.get(&(ty, v)) {
            return c;
        }
        let Some(entry) = self.b.func.layout.entry_block() else {
            // Nothing emitted yet: the current block is the entry, but it is not laid out.
            return self.b.ins().iconst(ty, v);
        };
        let mut pos = FuncCursor::new(self.b.func).at_first_insertion_point(entry);
        let c = pos.ins().iconst(ty, v);
        self.consts.insert((ty, v), c);
        c
    }

    /// The value of `v` when it is a 64-bit integer constant.
    fn known(&self, v: Value) -> Option<i64> {
        let dfg = &self.b.func.dfg;
        if dfg.value_type(v) != I64 {
            return None;
        }
        match dfg.value_def(v) {
            ValueDef::Result(inst, 0) => match dfg.insts[inst] {
                InstructionData::UnaryImm { opcode: Opcode::Iconst, imm } => Some(imm.bits()),
                _ => None,
            },
            _ => None,
        }
    }

    /// `x + c`: `x` itself when `c` is 0, a constant when `x` is one.
    pub fn iadd_imm(&mut self, x: Value, c: i64) -> Value {
        if c == 0 {
            return x;
        }
        if let Some(k) = self.known(x) {
            return self.i64(k.wrapping_add(c));
        }
        let ty = self.b.func.dfg.value_type(x).lane_type();
        let c = self.iconst(ty, c);
        self.b.ins().iadd(x, c)
    }

    /// `x · c`: `x` itself when `c` is 1, a constant when `c` is 0 or `x` is a constant.
    pub fn imul_imm(&mut self, x: Value, c: i64) -> Value {
        if c == 1 {
            return x;
        }
        let ty = self.b.func.dfg.value_type(x).lane_type();
        if c == 0 && ty == I64 {
            return self.i64(0);
        }
        if let Some(k) = self.known(x) {
            return self.i64(k.wrapping_mul(c));
        }
        let c = self.iconst(ty, c);
        self.b.ins().imul(x, c)
    }

    /// `x + y`, folded as [`Emit::iadd_imm`] folds when either is a constant.
    pub fn iadd(&mut self, x: Value, y: Value) -> Value {
        match (self.known(x), self.known(y)) {
            (_, Some(c)) => self.iadd_imm(x, c),
            (Some(c), _) => self.iadd_imm(y, c),
            _ => self.b.ins().iadd(x, y),
        }
    }

    /// `x · y`, folded as [`Emit::imul_imm`] folds when either is a constant.
    pub fn imul(&mut self, x: Value, y: Value) -> Value {
        match (self.known(x), self.known(y)) {
            (_, Some(c)) => self.imul_imm(x, c),
            (Some(c), _) => self.imul_imm(y, c),
            _ => self.b.ins().imul(x, y),
        }
    }

    /// `op(x, c)` for an operation with a constant right operand (shifts, divisions,
    /// comparisons' operands, masks): the constant shared, as [`Emit::iconst`] does.
    pub fn with_imm(
        &mut self,
        x: Value,
        c: i64,
        op: impl FnOnce(FuncInstBuilder, Value, Value) -> Value,
    ) -> Value {
        let ty = self.b.func.dfg.value_type(x).lane_type();
        let c = self.iconst(ty, c);
        op(self.b.ins(), x, c)
    }

    /// `x << c`.
    pub fn ishl_imm(&mut self, x: Value, c: i64) -> Value {
        self.with_imm(x, c, |ins, x, c| ins.ishl(x, c))
    }

    /// `x cc c`, an I8 truth value.
    pub fn icmp_imm(&mut self, cc: IntCC, x: Value, c: i64) -> Value {
        self.with_imm(x, c, |ins, x, c| ins.icmp(cc, x, c))
    }

    /// A float constant of type `ty` (`F32` or `F32X4`).
    pub fn fconst(&mut self, ty: Type, x: f32) -> Value {
        let c = self.b.ins().f32const(x);
        if ty == F32X4 { self.b.ins().splat(F32X4, c) } else { c }
    }

    /// The address of element `idx` (an I64 count of 4-byte elements) of the buffer at `off`.
    pub fn addr(&mut self, off: usize, idx: Value) -> Value {
        let p = self.element(idx);
        self.iadd_imm(p, off as i64)
    }

    /// The arena base plus `idx` 4-byte elements.
    fn element(&mut self, idx: Value) -> Value {
        let bytes = self.ishl_imm(idx, 2);
        self.iadd(self.base, bytes)
    }

    /// The address of element `idx` of the buffer at `off` as a base and an immediate offset
    /// for a load or store: the offset in the instruction (when it fits in 32 bits) spares
    /// Cranelift an addition to fold.
    fn place(&mut self, off: usize, idx: Value) -> (Value, i32) {
        match i32::try_from(off) {
            Ok(imm) => (self.element(idx), imm),
            Err(_) => (self.addr(off, idx), 0),
        }
    }

    pub fn load(&mut self, ty: Type, off: usize, idx: Value) -> Value {
        let (a, imm) = self.place(off, idx);
        let flags = if ty.is_vector() { vmem() } else { mem() };
        self.b.ins().load(ty, flags, a, imm)
    }

    /// A load from a buffer the kernel never writes: read-only and movable, so Cranelift may
    /// schedule it freely (and rematerialise it instead of spilling).
    pub fn load_ro(&mut self, ty: Type, off: usize, idx: Value) -> Value {
        let (a, imm) = self.place(off, idx);
        let flags = if ty.is_vector() { vmem() } else { mem() }.with_readonly().with_can_move();
        self.b.ins().load(ty, flags, a, imm)
    }

    pub fn store(&mut self, off: usize, idx: Value, v: Value) {
        let (a, imm) = self.place(off, idx);
        let flags = if self.b.func.dfg.value_type(v).is_vector() { vmem() } else { mem() };
        self.b.ins().store(flags, v, a, imm);
    }

    /// `for i in (lo..hi).step_by(step) { body(i) }`, with `i` an I64; nothing when empty.
    pub fn for_range(&mut self, lo: i64, hi: i64, step: i64, mut body: impl FnMut(&mut Self, Value)) {
        if lo >= hi {
            return;
        }
        // One round is straight code: a loop costs Cranelift two blocks and a few live ranges
        // (unrolling two or four rounds cost more than it saved: more code for the e-graph).
        if hi - lo <= step {
            let i = self.i64(lo);
            body(self, i);
            return;
        }
        let header = self.b.create_block();
        let exit = self.b.create_block();
        self.b.append_block_param(header, I64);
        let start = self.i64(lo);
        self.b.ins().jump(header, &[BlockArg::Value(start)]);
        self.b.switch_to_block(header);
        let i = self.b.block_params(header)[0];
        body(self, i);
        let next = self.iadd_imm(i, step);
        let more = self.icmp_imm(IntCC::SignedLessThan, next, hi);
        self.b.ins().brif(more, header, &[BlockArg::Value(next)], exit, &[]);
        self.b.switch_to_block(exit);
    }

    /// `for i in lo..hi { body(i) }`: a counted loop when both bounds are constants, else one
    /// with bounds known only at run time.
    pub fn for_between(&mut self, lo: Value, hi: Value, body: impl FnMut(&mut Self, Value)) {
        match (self.known(lo), self.known(hi)) {
            (Some(lo), Some(hi)) => self.for_range(lo, hi, 1, body),
            _ => self.for_dynamic(lo, hi, body),
        }
    }

    /// `for i in lo..hi { body(i) }` with bounds known only at run time.
    pub fn for_dynamic(&mut self, lo: Value, hi: Value, mut body: impl FnMut(&mut Self, Value)) {
        let header = self.b.create_block();
        let body_block = self.b.create_block();
        let exit = self.b.create_block();
        self.b.append_block_param(header, I64);
        self.b.ins().jump(header, &[BlockArg::Value(lo)]);
        self.b.switch_to_block(header);
        let i = self.b.block_params(header)[0];
        let more = self.b.ins().icmp(IntCC::SignedLessThan, i, hi);
        self.b.ins().brif(more, body_block, &[], exit, &[]);
        self.b.switch_to_block(body_block);
        body(self, i);
        let next = self.iadd_imm(i, 1);
        self.b.ins().jump(header, &[BlockArg::Value(next)]);
        self.b.switch_to_block(exit);
    }

    /// An elementwise loop over `n` elements: `body(ty, i)` with `ty` F32X4 over the vector
    /// part and F32 over the tail.
    pub fn elementwise(&mut self, n: usize, body: impl FnMut(&mut Self, Type, Value)) {
        self.elementwise_in(0, n, body);
    }

    /// `elementwise` over the elements `from..to`.
    pub fn elementwise_in(&mut self, from: usize, to: usize, mut body: impl FnMut(&mut Self, Type, Value)) {
        let vec_end = (from + to.saturating_sub(from) / 4 * 4) as i64;
        self.for_range(from as i64, vec_end, 4, |e, i| body(e, F32X4, i));
        self.for_range(vec_end, to as i64, 1, |e, i| body(e, F32, i));
    }

    /// `elementwise` over the chunks `lo..hi` of `chunk` elements (`chunk` a multiple of 4):
    /// the part of `n` elements one thread takes.
    pub fn elementwise_chunks(
        &mut self,
        n: usize,
        chunk: usize,
        lo: Value,
        hi: Value,
        body: impl FnMut(&mut Self, Type, Value),
    ) {
        let full = n / chunk;
        // Both parts call `body`; one runs after the other.
        let body = std::cell::RefCell::new(body);
        let mut whole = |e: &mut Self, c: Value| {
            let start = e.imul_imm(c, chunk as i64);
            e.for_range(0, chunk as i64, 4, |e, i| {
                let idx = e.iadd(start, i);
                (body.borrow_mut())(e, F32X4, idx);
            });
        };
        let mut tail =
            |e: &mut Self| e.elementwise_in(full * chunk, n, |e, ty, i| (body.borrow_mut())(e, ty, i));
        self.units((lo, hi), full, !n.is_multiple_of(chunk), &mut whole, &mut tail);
    }

    /// The work units `lo..hi` of a kernel split into `full` whole units and, when `partial`,
    /// one partial unit after them (number `full`): `whole(u)` for every whole unit of the
    /// range, then `partial_unit()` if the range holds the partial one, so that exactly one
    /// thread runs it.
    pub fn units(
        &mut self,
        (lo, hi): (Value, Value),
        full: usize,
        partial: bool,
        whole: &mut dyn FnMut(&mut Self, Value),
        partial_unit: &mut dyn FnMut(&mut Self),
    ) {
        // No loop over whole units where there are none (a parameter smaller than a chunk).
        if full > 0 {
            let top = self.i64(full as i64);
            let cap = self.b.ins().smin(hi, top);
            self.for_dynamic(lo, cap, |e, u| whole(e, u));
        }
        if partial {
            let reaches = self.icmp_imm(IntCC::SignedGreaterThan, hi, full as i64);
            let starts = self.icmp_imm(IntCC::SignedLessThanOrEqual, lo, full as i64);
            let holds = self.b.ins().band(reaches, starts);
            self.when(holds, |e| partial_unit(e));
        }
    }

    /// `if cond { then() }`.
    pub fn when(&mut self, cond: Value, then: impl FnOnce(&mut Self)) {
        let yes = self.b.create_block();
        let done = self.b.create_block();
        self.b.ins().brif(cond, yes, &[], done, &[]);
        self.b.switch_to_block(yes);
        then(self);
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(done);
    }

    /// eˣ for F32 or F32X4: x = n·ln2 + r, a degree-6 polynomial for eʳ, 2ⁿ from the exponent
    /// bits. Relative error about 2e-7 over the range where the result is finite and normal.
    /// n is rounded by adding 1.5·2²³ in the same `fma` as the scaling (the float's ulp there
    /// is 1), which also leaves n in the sum's low bits: no rounding or conversion instruction.
    ///
    /// Past the range the result is what `f32::exp` (the interpreter) gives: +∞ above it, 0
    /// below, so both backends see an overflow at the same step.
    pub fn exp(&mut self, ty: Type, x: Value) -> Value {
        let (x, above, below) = self.clamp(ty, x, -87.336_55, 88.376_26);
        let y = self.exp_in_range(ty, x, false);
        let inf = self.fconst(ty, f32::INFINITY);
        let zero = self.fconst(ty, 0.0);
        let y = self.select(ty, above, inf, y);
        self.select(ty, below, zero, y)
    }

    /// `x` clamped to `[lo, hi]`, and the comparisons `x > hi`, `x < lo`. By compare and select
    /// (Cranelift's vector fmin/fmax are long NaN-careful sequences); a NaN compares false both
    /// times and stays NaN.
    fn clamp(&mut self, ty: Type, x: Value, lo: f32, hi: f32) -> (Value, Value, Value) {
        let hi = self.fconst(ty, hi);
        let lo = self.fconst(ty, lo);
        let above = self.b.ins().fcmp(FloatCC::GreaterThan, x, hi);
        let x = self.select(ty, above, hi, x);
        let below = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let x = self.select(ty, below, lo, x);
        (x, above, below)
    }

    /// eˣ for x within [-87.34, 88.38] (or NaN); with `negated`, e⁻ˣ for x within [-88.38,
    /// 87.34], bit for bit what eˣ gives at −x, without negating x first: with s = −r the
    /// reduced argument, 1 + r + r²·P(r) is 1 − s + s²·P(−s), P's odd coefficients negated.
    fn exp_in_range(&mut self, ty: Type, x: Value, negated: bool) -> Value {
        let sign = if negated { -1.0 } else { 1.0 };
        let log2e = self.fconst(ty, sign * std::f32::consts::LOG2_E);
        let magic = self.fconst(ty, 12_582_912.0);
        let shifted = self.b.ins().fma(x, log2e, magic);
        let fx = self.b.ins().fsub(shifted, magic);
        // r = x − n·C1 − n·C2 (or s = x + n·C1 + n·C2 = −r).
        let mut r = x;
        for c in [0.693_359_4, -2.121_944_4e-4] {
            let cc = self.fconst(ty, c);
            let t = self.b.ins().fmul(fx, cc);
            r = if negated { self.b.ins().fadd(r, t) } else { self.b.ins().fsub(r, t) };
        }
        let z = self.b.ins().fmul(r, r);
        let coefficients =
            [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
        // Coefficient of r^k, k = 5 − i; negated for odd k when the argument is −r.
        let coefficient = |i: usize, c: f32| if negated && (5 - i) % 2 == 1 { -c } else { c };
        let mut y = self.fconst(ty, coefficient(0, coefficients[0]));
        for (i, &c) in coefficients.iter().enumerate().skip(1) {
            let cc = self.fconst(ty, coefficient(i, c));
            y = self.b.ins().fma(y, r, cc);
        }
        let one = self.fconst(ty, 1.0);
        let rp1 = if negated { self.b.ins().fsub(one, r) } else { self.b.ins().fadd(r, one) };
        let y = self.b.ins().fma(y, z, rp1);
        // The sum's bits are 0x4B40_0000 + n; shifted left by 23 only n + 127 survives.
        let ity = if ty == F32X4 { I32X4 } else { I32 };
        let n = self.bitcast(ity, shifted);
        let bias = if ty == F32X4 {
            let c = self.b.ins().iconst(I32, 127);
            self.b.ins().splat(I32X4, c)
        } else {
            self.b.ins().iconst(I32, 127)
        };
        let n = self.iadd(n, bias);
        let n = self.ishl_imm(n, 23);
        let pow2n = self.bitcast(ty, n);
        self.b.ins().fmul(y, pow2n)
    }

    /// 1 / (1 + e⁻ˣ), with e⁻ˣ computed from x directly (no negation). Below −88.38, where e⁻ˣ
    /// overflows, 0; above 87.34 e⁻ˣ is clamped to about 1e-38, which 1 + e⁻ˣ rounds away: 1,
    /// as the unclamped formula gives.
    pub fn sigmoid(&mut self, ty: Type, x: Value) -> Value {
        let (x, _, overflows) = self.clamp(ty, x, -88.376_26, 87.336_55);
        let e = self.exp_in_range(ty, x, true);
        let one = self.fconst(ty, 1.0);
        let d = self.b.ins().fadd(one, e);
        let s = self.b.ins().fdiv(one, d);
        let zero = self.fconst(ty, 0.0);
        self.select(ty, overflows, zero, s)
    }

    /// tanh x: for |x| < 0.625 the odd polynomial x + x³·P(x²) (Cephes' `tanhf`, relative
    /// error about 1e-7 down to the smallest denormal; ±0 stays ±0), else 1 − 2 / (e²ˣ + 1),
    /// whose cancellation near 0 cost up to 6e-3 of relative error there.
    pub fn tanh(&mut self, ty: Type, x: Value) -> Value {
        let two = self.fconst(ty, 2.0);
        let x2 = self.b.ins().fmul(x, two);
        // e²ˣ clamped: past the range 2 / (e²ˣ + 1) rounds to 0 or 2 either way.
        let (x2, _, _) = self.clamp(ty, x2, -87.336_55, 88.376_26);
        let e = self.exp_in_range(ty, x2, false);
        let one = self.fconst(ty, 1.0);
        let d = self.b.ins().fadd(e, one);
        let q = self.b.ins().fdiv(two, d);
        let far = self.b.ins().fsub(one, q);
        let z = self.b.ins().fmul(x, x);
        let mut p = self.fconst(ty, -5.704_988_7e-3);
        for c in [2.063_909e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1] {
            let cc = self.fconst(ty, c);
            p = self.b.ins().fma(p, z, cc);
        }
        let xz = self.b.ins().fmul(x, z);
        let near = self.b.ins().fma(p, xz, x);
        let ax = self.b.ins().fabs(x);
        let bound = self.fconst(ty, 0.625);
        let small = self.b.ins().fcmp(FloatCC::LessThan, ax, bound);
        self.select(ty, small, near, far)
    }

    /// ln x (scalar), through the host's `logf`.
    pub fn ln(&mut self, x: Value) -> Value {
        match self.logf {
            Some(f) => {
                let call = self.b.ins().call(f, &[x]);
                self.b.inst_results(call)[0]
            }
            None => x,
        }
    }

    /// `c ? a : b` for F32 or F32X4 given an F32 comparison result of the same shape.
    pub fn select(&mut self, ty: Type, cond: Value, a: Value, b: Value) -> Value {
        if ty == F32X4 {
            // A vector comparison gives an i32x4 mask; bitselect wants the operands' type.
            let mask = self.bitcast(F32X4, cond);
            self.b.ins().bitselect(mask, a, b)
        } else {
            self.b.ins().select(cond, a, b)
        }
    }

    /// The same bits as type `ty` (lanes in little-endian order).
    pub fn bitcast(&mut self, ty: Type, v: Value) -> Value {
        let flags = MemFlagsData::new().with_endianness(Endianness::Little);
        self.b.ins().bitcast(ty, flags, v)
    }

    /// Horizontal sum of an F32X4.
    pub fn hsum(&mut self, v: Value) -> Value {
        let a = self.b.ins().extractlane(v, 0);
        let b = self.b.ins().extractlane(v, 1);
        let c = self.b.ins().extractlane(v, 2);
        let d = self.b.ins().extractlane(v, 3);
        let ab = self.b.ins().fadd(a, b);
        let cd = self.b.ins().fadd(c, d);
        self.b.ins().fadd(ab, cd)
    }
}

// ---- the elementwise math every kernel family shares -------------------------------------

/// An elementwise op applied to C in the store (see `fuse`); offsets are arena buffers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EpOp {
    /// `+ bias[j]`.
    Bias(usize),
    Unary(UnaryFn),
    /// The derivative of an activation with output `y` (a [M, N] buffer), times C.
    ActGrad(UnaryFn, usize),
    /// `C op other` (or `other op C` when `!c_left`), `other` a [M, N] buffer.
    Binary(BinaryFn, usize, bool),
    Scale(f32),
}

/// Applies elementwise `ops` to `v` (of type `ty`, F32 or F32X4), the value at flat index
/// `idx`; a bias is indexed by `col` (only a matmul's epilogue has one). `stable`: the other
/// operands do not change while the kernel runs, so their loads may move.
pub fn apply_ops(
    e: &mut Emit,
    ty: Type,
    ops: &[EpOp],
    mut v: Value,
    idx: Value,
    col: Option<Value>,
    stable: bool,
) -> Value {
    let load = |e: &mut Emit, off: usize, i: Value| {
        if stable { e.load_ro(ty, off, i) } else { e.load(ty, off, i) }
    };
    for op in ops {
        v = match *op {
            EpOp::Bias(off) => {
                let col = col.unwrap_or(idx);
                let b = e.load_ro(ty, off, col);
                e.b.ins().fadd(v, b)
            }
            EpOp::Unary(f) => unary(e, ty, f, v),
            EpOp::ActGrad(f, y) => {
                let yv = load(e, y, idx);
                act_grad(e, ty, f, yv, v)
            }
            EpOp::Binary(f, other, c_left) => {
                let o = load(e, other, idx);
                let (a, b) = if c_left { (v, o) } else { (o, v) };
                match f {
                    BinaryFn::Add => e.b.ins().fadd(a, b),
                    BinaryFn::Sub => e.b.ins().fsub(a, b),
                    BinaryFn::Mul => e.b.ins().fmul(a, b),
                    BinaryFn::Div => e.b.ins().fdiv(a, b),
                }
            }
            EpOp::Scale(c) => {
                let k = e.fconst(ty, c);
                e.b.ins().fmul(v, k)
            }
        };
    }
    v
}

/// `f(x)` for F32 or F32X4.
pub fn unary(e: &mut Emit, ty: Type, f: UnaryFn, x: Value) -> Value {
    match f {
        UnaryFn::Relu => {
            let z = e.fconst(ty, 0.0);
            let pos = e.b.ins().fcmp(FloatCC::GreaterThan, x, z);
            e.select(ty, pos, x, z)
        }
        UnaryFn::LeakyRelu(a) => {
            let z = e.fconst(ty, 0.0);
            let pos = e.b.ins().fcmp(FloatCC::GreaterThan, x, z);
            let k = e.fconst(ty, a);
            let ax = e.b.ins().fmul(x, k);
            e.select(ty, pos, x, ax)
        }
        UnaryFn::Sigmoid => e.sigmoid(ty, x),
        UnaryFn::Tanh => e.tanh(ty, x),
        UnaryFn::Abs => e.b.ins().fabs(x),
        UnaryFn::Square => e.b.ins().fmul(x, x),
        UnaryFn::Neg => e.b.ins().fneg(x),
        UnaryFn::Exp => e.exp(ty, x),
        UnaryFn::Sign => sign(e, ty, x),
    }
}

/// −1, 0 or 1 by the sign of `x` (0 for ±0 and NaN).
pub fn sign(e: &mut Emit, ty: Type, x: Value) -> Value {
    let z = e.fconst(ty, 0.0);
    let one = e.fconst(ty, 1.0);
    let m1 = e.fconst(ty, -1.0);
    let pos = e.b.ins().fcmp(FloatCC::GreaterThan, x, z);
    let neg = e.b.ins().fcmp(FloatCC::LessThan, x, z);
    let n = e.select(ty, neg, m1, z);
    e.select(ty, pos, one, n)
}

/// `d · f'(x)` given the activation's output `y = f(x)`, for F32 or F32X4.
pub fn act_grad(e: &mut Emit, ty: Type, f: UnaryFn, y: Value, d: Value) -> Value {
    match f {
        UnaryFn::Relu | UnaryFn::LeakyRelu(_) => {
            let z = e.fconst(ty, 0.0);
            let pos = e.b.ins().fcmp(FloatCC::GreaterThan, y, z);
            let other = match f {
                UnaryFn::LeakyRelu(a) => {
                    let k = e.fconst(ty, a);
                    e.b.ins().fmul(d, k)
                }
                _ => z,
            };
            e.select(ty, pos, d, other)
        }
        UnaryFn::Sigmoid => {
            let one = e.fconst(ty, 1.0);
            let q = e.b.ins().fsub(one, y);
            let t = e.b.ins().fmul(y, q);
            e.b.ins().fmul(d, t)
        }
        UnaryFn::Tanh => {
            let one = e.fconst(ty, 1.0);
            let yy = e.b.ins().fmul(y, y);
            let t = e.b.ins().fsub(one, yy);
            e.b.ins().fmul(d, t)
        }
        _ => d,
    }
}
