//! Stride-1 transposed convolutions as convolutions, where that moves less memory.
//!
//! A transposed convolution of `x [B, Cx, H, W]` by `w [Cx, Cy, K, K]` at stride 1 is the
//! convolution of `x` by `w` flipped (`Op::FlipKernel`: `[Cy, Cx, K, K]`, each kernel turned
//! 180°) with padding `K − 1 − p`. The native code computes a transposed convolution as a
//! matmul into `Cy·K²` rows per input pixel, then adds each row into its output window
//! (col2im); a convolution as im2col's `Cx·K²` rows, then a matmul straight into the output.
//! When `Cx < Cy` — conv2d's input gradient of a layer that widens (a U-Net decoder's
//! convolution after a concatenation), a deconvolution that widens — the convolution moves
//! `Cy / Cx` times less, and its matmul is the better shaped. The interpreter runs the graph as
//! written (the reference); the native code runs it rewritten.

use crate::ir::{Graph, NodeId, Op};

/// The graph with each qualifying transposed convolution rewritten.
pub fn rewrite(g: &Graph) -> Result<Graph, String> {
    let mut out = g.empty_like();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.len());
    for id in g.ids() {
        let mut op = g.node(id).op.clone();
        op.map_operands(|o| map[o.index()]);
        let span = g.span(id);
        let new = match op {
            Op::ConvTranspose2d { x, w, stride: [1, 1], pad, out_pad: [0, 0] } if worth(&out, x, w, pad) => {
                let s = &out.ty(w).shape;
                let pad = [s[2] - 1 - pad[0], s[3] - 1 - pad[1]];
                let w = out.add(Op::FlipKernel { w }, span)?;
                out.add(Op::Conv2d { x, w, stride: [1, 1], pad }, span)?
            }
            op => out.add(op, span)?,
        };
        map.push(new);
    }
    for (name, id) in &g.outputs {
        out.outputs.push((name.clone(), map[id.index()]));
    }
    Ok(out)
}

/// Whether the transposed convolution of `x` by `w` with padding `pad` has fewer input
/// channels than output ones, and a padding the flipped convolution can take.
fn worth(g: &Graph, x: NodeId, w: NodeId, pad: [usize; 2]) -> bool {
    let (xs, ws) = (&g.ty(x).shape, &g.ty(w).shape);
    xs.len() == 4 && ws.len() == 4 && ws[0] < ws[1] && pad[0] < ws[2] && pad[1] < ws[3]
}
