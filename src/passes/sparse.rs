//! Switch maps: the unpooled plane of a max pool (`scatter` of its values at its switches) and
//! the gradient that reaches a pool's input (`scatter_add` of the output gradient) are zero
//! but at one place per window — three in four zeros for a 2×2 pool. The convolutions that
//! read or write such a map are rewritten to skip the zeros (`Op::SparseConvT`,
//! `Op::GatherConv`, `Op::SparseWeightGrad`):
//!
//! - `conv_transpose2d(map)` (a decoder's deconvolution after `unpool`; conv2d's input
//!   gradient through a pool) and `conv2d(map)` (a convolution after `unpool`) scatter each
//!   value around its switch;
//! - `gather(conv2d(x), switches)` and `gather(conv_transpose2d(x), switches)` (the gradient
//!   of an unpooled map that a deconvolution or a convolution read) compute the convolution
//!   only where it is read;
//! - the weight gradients whose output gradient (conv2d) or input (either) is a map sum over
//!   the switches only;
//! - `act_grad(map, y)` is the map of `act_grad(v, gather(y))`, and a bias gradient of a map
//!   the sum of its values.
//!
//! The same sums without the products by zero: the results equal the dense ops' up to the
//! order of additions. Only switches that never repeat qualify (pools with stride ≥ kernel),
//! and only stride-1 convolutions; the rest stays dense. The interpreter runs the graph as
//! written (the reference); the native code runs it rewritten.

use crate::ir::{Graph, NodeId, Op};

/// The largest switch plane rewritten (the kernels divide a switch by the plane's width with a
/// 32-bit multiply, exact while `switch · width < 2³²`).
const MAX_PLANE: usize = 1 << 16;

/// A switch map: `scatter(v, idx)` onto `height × width` planes.
#[derive(Clone, Copy)]
struct Map {
    v: NodeId,
    idx: NodeId,
    height: usize,
    width: usize,
}

impl Map {
    /// The map's transposed convolution (or, with `flip`, convolution) by `w`.
    fn conv_t(self, w: NodeId, pad: usize, flip: bool) -> Op {
        let Map { v, idx, height, width } = self;
        Op::SparseConvT { v, idx, w, height, width, pad, flip }
    }

    /// A weight gradient with the map on one side and `d` on the other.
    fn weight_grad(self, d: NodeId, kernel: usize, pad: usize, flip: bool) -> Op {
        let Map { v, idx, height, width } = self;
        Op::SparseWeightGrad { v, idx, d, kernel, pad, height, width, flip }
    }
}

/// `g` with every convolution of a switch map rewritten, and what no longer feeds an output or
/// an update removed.
pub fn rewrite(g: &Graph) -> Result<Graph, String> {
    let mut out = g.empty_like();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.len());
    // Indexed by the new graph's nodes.
    let mut maps: Vec<Option<Map>> = Vec::new();
    let mut updated = false;
    for id in g.ids() {
        let mut op = g.node(id).op.clone();
        op.map_operands(|o| map[o.index()]);
        let span = g.span(id);
        let map_of = |n: NodeId, maps: &[Option<Map>]| maps.get(n.index()).copied().flatten();
        let mut made: Option<Map> = None;
        let new = match op {
            Op::Scatter { v, idx, height, width, .. } if unique(&out, idx) && height * width <= MAX_PLANE => {
                made = Some(Map { v, idx, height, width });
                out.add(op, span)?
            }
            Op::ActGrad { f, y, dy } if map_of(dy, &maps).is_some() => {
                let m = map_of(dy, &maps).ok_or("no map")?;
                let gy = out.add(Op::Gather { x: y, idx: m.idx }, span)?;
                let v = out.add(Op::ActGrad { f, y: gy, dy: m.v }, span)?;
                made = Some(Map { v, ..m });
                let (height, width) = (m.height, m.width);
                out.add(Op::Scatter { v, idx: m.idx, height, width, accumulate: true }, span)?
            }
            Op::SumToAxis1 { x } if map_of(x, &maps).is_some() => {
                let m = map_of(x, &maps).ok_or("no map")?;
                out.add(Op::SumToAxis1 { x: m.v }, span)?
            }
            // The switch-map kernels take square kernels and one padding for both axes.
            Op::ConvTranspose2d { x, w, stride: [1, 1], pad: [pad, p2], out_pad: [0, 0] }
                if map_of(x, &maps).is_some() && pad == p2 && square(&out, w) =>
            {
                out.add(map_of(x, &maps).ok_or("no map")?.conv_t(w, pad, false), span)?
            }
            // conv2d of a map: the same scatter with the kernel flipped (padding K - 1 - pad).
            Op::Conv2d { x, w, stride: [1, 1], pad: [pad, p2] }
                if map_of(x, &maps).is_some() && pad == p2 && flippable(&out, w, pad) =>
            {
                let pad = kernel(&out, w) - 1 - pad;
                out.add(map_of(x, &maps).ok_or("no map")?.conv_t(w, pad, true), span)?
            }
            Op::Conv2dWeightGrad { x, dy, kernel: [kernel, k2], stride: [1, 1], pad: [pad, p2] }
                if map_of(dy, &maps).is_some() && kernel == k2 && pad == p2 =>
            {
                out.add(map_of(dy, &maps).ok_or("no map")?.weight_grad(x, kernel, pad, false), span)?
            }
            Op::Conv2dWeightGrad { x, dy, kernel: [kernel, k2], stride: [1, 1], pad: [pad, p2] }
                if map_of(x, &maps).is_some() && kernel == k2 && pad == p2 && pad < kernel =>
            {
                let pad = kernel - 1 - pad;
                out.add(map_of(x, &maps).ok_or("no map")?.weight_grad(dy, kernel, pad, true), span)?
            }
            Op::ConvTranspose2dWeightGrad { x, dy, kernel: [kernel, k2], stride: [1, 1], pad: [pad, p2] }
                if map_of(x, &maps).is_some() && kernel == k2 && pad == p2 =>
            {
                out.add(map_of(x, &maps).ok_or("no map")?.weight_grad(dy, kernel, pad, false), span)?
            }
            // Reads the convolution's operands where the gather is: no update may come between.
            Op::Gather { x, idx } if !updated && plane(&out, x) <= MAX_PLANE => match out.node(x).op {
                Op::Conv2d { x: cx, w, stride: [1, 1], pad: [pad, p2] } if pad == p2 && square(&out, w) => {
                    out.add(Op::GatherConv { x: cx, w, idx, pad, flip: false }, span)?
                }
                Op::ConvTranspose2d { x: cx, w, stride: [1, 1], pad: [pad, p2], out_pad: [0, 0] }
                    if pad == p2 && flippable(&out, w, pad) =>
                {
                    let pad = kernel(&out, w) - 1 - pad;
                    out.add(Op::GatherConv { x: cx, w, idx, pad, flip: true }, span)?
                }
                _ => out.add(op, span)?,
            },
            _ => {
                updated |= matches!(op, Op::Update { .. });
                out.add(op, span)?
            }
        };
        maps.resize(out.len(), None);
        maps[new.index()] = made;
        map.push(new);
    }
    for (name, id) in &g.outputs {
        out.outputs.push((name.clone(), map[id.index()]));
    }
    super::dce::drop_unread(&out)
}

/// Whether the switches `idx` never repeat within a plane: those of a pool whose windows do
/// not overlap.
fn unique(g: &Graph, idx: NodeId) -> bool {
    matches!(g.node(idx).op, Op::PoolArgmax { kernel, stride, .. } if stride[0] >= kernel[0] && stride[1] >= kernel[1])
}

fn plane(g: &Graph, n: NodeId) -> usize {
    g.ty(n).shape.iter().skip(2).product()
}

fn kernel(g: &Graph, w: NodeId) -> usize {
    g.ty(w).shape.get(2).copied().unwrap_or(0)
}

/// Whether the weight `w`'s kernel is as wide as it is high.
fn square(g: &Graph, w: NodeId) -> bool {
    let s = &g.ty(w).shape;
    s.len() == 4 && s[2] == s[3]
}

/// Whether a stride-1 convolution with weight `w` and padding `pad` can run flipped: its
/// padding becomes `K - 1 - pad`.
fn flippable(g: &Graph, w: NodeId, pad: usize) -> bool {
    square(g, w) && pad < kernel(g, w)
}
