#!/usr/bin/env bash
# Pack FITS/PNG cutouts into sharded HDF5 with MPI ranks, on any SLURM cluster.
#
#   sbatch slurm_scripts/pack.sh --catalog CAT --out OUT [--shard-size N] [key=value ...]
#   sbatch -N 2 --ntasks-per-node 16 -p PARTITION slurm_scripts/pack.sh --catalog ... --out ...
#
# One MPI rank per SLURM task; each rank writes its own shards, rank 0 the
# manifest. A re-submitted job skips the shards already finished. Submit from
# the repository root (output goes to sout/). The environment: an activated
# virtualenv, or $SSLSKY_VENV, or ./.venv if present.
#SBATCH --job-name=sslsky-pack
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --output=sout/%x-%j.out
#SBATCH --error=sout/%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$PWD}"
venv=${SSLSKY_VENV:-${VIRTUAL_ENV:-}}
if [ -z "$venv" ] && [ -x .venv/bin/sslsky ]; then venv=.venv; fi
sslsky=sslsky
if [ -n "$venv" ]; then sslsky="$venv/bin/sslsky"; fi

ntasks=${SLURM_NTASKS:-1}
mpi_args=()
# OpenMPI refuses root unless told (containers, CI); harmless otherwise.
if [ "$(id -u)" -eq 0 ]; then mpi_args+=(--allow-run-as-root); fi

echo "pack: job ${SLURM_JOB_ID:-none} on ${SLURM_JOB_NODELIST:-$(hostname)}, $ntasks ranks, $(date -Is)"
# Inside an allocation mpirun takes hosts and slots from SLURM (direct srun
# launch needs an MPI built with PMI support, which many site builds lack).
status=0
if [ "$ntasks" -gt 1 ]; then
  mpirun "${mpi_args[@]}" -n "$ntasks" "$sslsky" pack "$@" || status=$?
else
  "$sslsky" pack "$@" || status=$?
fi
echo "pack: finished with status $status at $(date -Is) (0 all packed, 3 some cutouts rejected: see OUT/rejected.csv)"
exit $status
