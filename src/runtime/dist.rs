//! Data-parallel training: the processes of one run and what they share. Every process builds
//! the same native step; each global batch is split into contiguous shards, one per process;
//! each computes loss and gradients on its shard, weighted by its share of the batch; one sum
//! over the processes (of one flat buffer: every gradient, then the loss and its terms) gives
//! every process the global batch's mean; each applies the same update, so the parameters stay
//! identical everywhere. Process 0 alone reads a checkpoint to resume from (and sends it) and
//! writes the run folder. The transport is MPI (`--features mpi`, `runtime::mpi`).

use std::ops::Range;

/// The collective operations a data-parallel run needs.
pub trait Collective {
    /// This process's number, 0 to `size() - 1`.
    fn rank(&self) -> usize;
    /// How many processes train together.
    fn size(&self) -> usize;
    /// Element-wise sum over the processes, in place.
    fn sum_f32(&self, v: &mut [f32]);
    fn sum_f64(&self, v: &mut [f64]);
    /// Process 0's bytes, on every process.
    fn broadcast(&self, bytes: &mut Vec<u8>);
}

/// The rows of a global batch of `len` that process `rank` of `size` takes: contiguous, and
/// the shards' sizes differ by at most one (the first `len % size` take one more).
pub fn shard(len: usize, rank: usize, size: usize) -> Range<usize> {
    let (per, extra) = (len / size.max(1), len % size.max(1));
    let start = rank * per + rank.min(extra);
    start..start + per + usize::from(rank < extra)
}

/// The seed of a process's random draws (noise, dropout, a Gaussian code's ε): process 0 keeps
/// the run's, so one process draws as a run without MPI does; the others' differ, so shards
/// draw independently. A run is a function of its seed and its number of processes.
pub fn process_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 { seed } else { seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) }
}

/// Sends process 0's `value` to every process (serialized as JSON; floats round-trip).
pub fn share<T: serde::Serialize + serde::de::DeserializeOwned>(
    dist: &dyn Collective,
    value: &mut T,
) -> Result<(), String> {
    let mut bytes =
        if dist.rank() == 0 { serde_json::to_vec(value).map_err(|e| e.to_string())? } else { Vec::new() };
    dist.broadcast(&mut bytes);
    if dist.rank() != 0 {
        *value = serde_json::from_slice(&bytes).map_err(|e| format!("the state sent by process 0: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_once_in_order() {
        for len in 0..40 {
            for size in 1..6 {
                let shards: Vec<Range<usize>> = (0..size).map(|r| shard(len, r, size)).collect();
                assert_eq!(shards[0].start, 0);
                assert_eq!(shards[size - 1].end, len);
                for w in shards.windows(2) {
                    assert_eq!(w[0].end, w[1].start, "{len} over {size}");
                }
                let sizes: Vec<usize> = shards.iter().map(|s| s.len()).collect();
                let (lo, hi) =
                    (sizes.iter().min().copied().unwrap_or(0), sizes.iter().max().copied().unwrap_or(0));
                assert!(hi - lo <= 1, "{len} over {size}: {sizes:?}");
            }
        }
    }

    #[test]
    fn process_zero_keeps_the_seed() {
        assert_eq!(process_seed(7, 0), 7);
        assert_ne!(process_seed(7, 1), 7);
        assert_ne!(process_seed(7, 1), process_seed(7, 2));
    }
}
