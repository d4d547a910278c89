#!/usr/bin/env bash
# Label-fraction sweep driver: submits the study as submitit job arrays from inside this small job,
# waits for them and collects results.csv + label-efficiency plots. Works on any SLURM cluster.
#
#   sbatch slurm_scripts/sweep.sh [CONFIG] [key=value ...]
#   sbatch -p PARTITION slurm_scripts/sweep.sh config/sweep_labelfrac.yaml ckpt=runs/x/encoder.pt \
#          data_path=/scratch/packed slurm.partition=gpu slurm.gpus_per_task=1
#
# The array tasks get their resources from the config's slurm.* keys, not from this script.
# Re-submitting skips finished cells. Submit from the repository root (logs go to sout/).
#SBATCH --job-name=sslsky-sweep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=48:00:00
#SBATCH --output=sout/%x-%j.out
#SBATCH --error=sout/%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$PWD}"
config=${1:-config/sweep_labelfrac.yaml}
[ $# -gt 0 ] && shift
venv=${SSLSKY_VENV:-${VIRTUAL_ENV:-}}
if [ -z "$venv" ] && [ -x .venv/bin/sslsky ]; then venv=.venv; fi
sslsky=sslsky
if [ -n "$venv" ]; then sslsky="$venv/bin/sslsky"; fi

echo "sweep: job ${SLURM_JOB_ID:-none} on $(hostname), config $config $*, $(date -Is)"
status=0
"$sslsky" sweep --config "$config" "$@" executor=slurm || status=$?
echo "sweep: finished with status $status at $(date -Is)"
exit $status
