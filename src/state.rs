//! The state a training run changes — parameters and the optimizer's buffers — shared by the
//! executors (`interp`, `codegen`) and the runtime above them. It knows only the IR's optimizer
//! settings.

use crate::ir::OptimizerFn;

/// Everything a training run changes: parameter values, the optimizer's per-parameter state
/// (PyTorch's `momentum_buffer`, or `exp_avg` and `exp_avg_sq`, and `step`), and the number of
/// steps taken.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct State {
    pub params: Vec<Vec<f32>>,
    /// Per parameter: the optimizer's buffers, empty until its first update.
    pub slots: Vec<Vec<Vec<f32>>>,
    /// Per parameter: how many updates it has had.
    pub param_steps: Vec<u64>,
    /// Training steps taken in the run (batches).
    pub step: u64,
}

impl State {
    pub fn new(params: Vec<Vec<f32>>) -> State {
        let n = params.len();
        State { params, slots: vec![Vec::new(); n], param_steps: vec![0; n], step: 0 }
    }

    /// Starts an update of parameter `p`: its values, its optimizer buffers (created as zeros
    /// on its first update) and the 1-based count of this update.
    pub fn begin_update(&mut self, p: usize, f: OptimizerFn) -> (&mut Vec<f32>, &mut Vec<Vec<f32>>, u64) {
        let n = self.params[p].len();
        let want = f.slot_count();
        if self.slots[p].len() != want {
            self.slots[p] = vec![vec![0.0; n]; want];
        }
        self.param_steps[p] += 1;
        (&mut self.params[p], &mut self.slots[p], self.param_steps[p])
    }
}
