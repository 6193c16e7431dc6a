//! The MPI transport of data-parallel training (`--features mpi`): rsmpi over the system's
//! MPI (Open MPI or MPICH).

use super::dist::Collective;
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

/// MPI's world: every process `mpirun` started. MPI is finalized when this is dropped.
pub struct Mpi {
    _universe: Universe,
    world: SimpleCommunicator,
}

impl Mpi {
    /// Initializes MPI when this process was started by an MPI launcher with more than one
    /// process; `None` otherwise (a plain run, or `mpirun -n 1`).
    pub fn start() -> Option<Mpi> {
        let universe = mpi::initialize()?;
        let world = universe.world();
        if world.size() <= 1 {
            return None;
        }
        Some(Mpi { _universe: universe, world })
    }

    /// Processes of this run on this machine (for the default thread count).
    pub fn local_size(&self) -> usize {
        let local = self.world.split_shared(self.world.rank());
        local.size().max(1) as usize
    }

    /// Ends every process of the run (one failed: the others would wait for it forever).
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn sum_f32(&self, v: &mut [f32]) {
        let local = v.to_vec();
        self.world.all_reduce_into(&local[..], v, SystemOperation::sum());
    }

    fn sum_f64(&self, v: &mut [f64]) {
        let local = v.to_vec();
        self.world.all_reduce_into(&local[..], v, SystemOperation::sum());
    }

    fn broadcast(&self, bytes: &mut Vec<u8>) {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        root.broadcast_into(&mut bytes[..]);
    }
}
