#!/usr/bin/env bash
# Data-parallel scaling on this machine: training samples/s of the bench specs as one process
# with 2 threads and as 2 MPI processes with 1 thread each, and the time per step of the sum
# over the processes. Needs a build with MPI:
#
#   .ci/install-mpi && cargo build --release --features mpi && benches/mpi_scaling.sh [EPOCHS]
#
# Each figure is the median of 3 runs; the machine is shared, so check `uptime` first.
set -euo pipefail
cd "$(dirname "$0")/.."
aec=target/release/aec
epochs=${1:-2}
mpirun=(mpirun --allow-run-as-root --oversubscribe --mca btl self,vader)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

median() { sort -g | sed -n 2p; }
rate() { sed -n 's/.* \([0-9]*\) samples\/s .*/\1/p' | head -n 1; }
reduce() { sed -n 's/.*took \([0-9.]*\) ms per step.*/\1/p' | head -n 1; }

printf '%-14s %18s %18s %8s %22s\n' spec "-n 1 --threads 2" "-n 2 --threads 1" ratio "sum over processes/step"
for spec in bench_mlp784 bench_conv28 bench_gru; do
    one=$(for k in 1 2 3; do
        "$aec" run --train "specs/$spec.ae" --epochs "$epochs" --threads 2 --out "$tmp/a$k" 2>/dev/null | rate
    done | median)
    two=""
    sums=""
    for k in 1 2 3; do
        out=$("${mpirun[@]}" -n 2 "$aec" run --train "specs/$spec.ae" --epochs "$epochs" --threads 1 --out "$tmp/b$k" 2>/dev/null)
        two+="$(echo "$out" | rate)"$'\n'
        sums+="$(echo "$out" | reduce)"$'\n'
    done
    two=$(printf '%s' "$two" | median)
    sums=$(printf '%s' "$sums" | median)
    ratio=$(awk -v a="$one" -v b="$two" 'BEGIN { printf "%.2f", b / a }')
    printf '%-14s %18s %18s %8s %19s ms\n' "$spec" "$one" "$two" "$ratio" "$sums"
done
