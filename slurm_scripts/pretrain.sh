#!/usr/bin/env bash
# MoCo v2 / BYOL / hybrid / votes-only / SimCLR pretraining with DDP, on any SLURM cluster (method= and model.arch= in the config).
#
#   sbatch slurm_scripts/pretrain.sh [CONFIG] [key=value ...]
#   sbatch -N 4 --ntasks-per-node 4 --gpus-per-node 4 -p PARTITION slurm_scripts/pretrain.sh \
#          config/pretrain_sdss.yaml data.path=/scratch/packed run_dir=runs/sdss-r50
#
# One task per GPU (set --ntasks-per-node equal to --gpus-per-node); ranks,
# MASTER_ADDR and MASTER_PORT come from the allocation (sslsky/dist.py).
# SLURM sends USR2 three minutes before the limit: all ranks stop at the same
# step, rank 0 checkpoints and requeues the job, and the requeued job resumes
# from the run directory. Rank 0 locks the run directory (run_dir/pretrain.lock):
# a second job on the same run_dir is refused (exit 2), the requeued job takes
# over the lock of its own earlier run. Submit from the repository root (logs go to sout/).
#SBATCH --job-name=sslsky-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=sout/%x-%j.out
#SBATCH --error=sout/%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$PWD}"
config=${1:-config/pretrain_sdss.yaml}
[ $# -gt 0 ] && shift
venv=${SSLSKY_VENV:-${VIRTUAL_ENV:-}}
if [ -z "$venv" ] && [ -x .venv/bin/sslsky ]; then venv=.venv; fi
sslsky=sslsky
if [ -n "$venv" ]; then sslsky="$venv/bin/sslsky"; fi

echo "pretrain: job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}," \
     "${SLURM_NTASKS:-1} tasks, config $config $*, $(date -Is)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# srun forwards USR2 to every task; each rank's handler only sets a flag.
status=0
srun --kill-on-bad-exit=1 "$sslsky" pretrain --config "$config" "$@" || status=$?
echo "pretrain: srun finished with status $status at $(date -Is)"
exit $status
