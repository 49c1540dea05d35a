# Sourced by every sbatch script here (from the repository root, where the job runs): the rendezvous address,
# the stop marker, and what to do when megalm stopped with a checkpoint on request.
#
# megalm writes MEGALM_STOP_FILE (rank 0) when a signal (SIGUSR1 before the time limit, SIGTERM at a preemption)
# or train.time_limit made it stop at a step boundary with a checkpoint. finish_or_requeue then requeues the job,
# and the requeued job resumes from that checkpoint by itself. The marker, not the launcher's exit status, decides:
# torchrun and mpirun do not pass their workers' status (75) through.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=${MASTER_ADDR:-$HEAD_NODE}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MEGALM_STOP_FILE=${MEGALM_STOP_FILE:-$PWD/.megalm-stopped-$SLURM_JOB_ID}
rm -f "$MEGALM_STOP_FILE"
echo "megalm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST;" \
  "rendezvous $MASTER_ADDR:$MASTER_PORT; started $(date +%s.%N)"

finish_or_requeue() {   # $1: the launcher's exit status
  if [ -f "$MEGALM_STOP_FILE" ]; then
    echo "megalm: $(cat "$MEGALM_STOP_FILE"); requeueing job $SLURM_JOB_ID"
    rm -f "$MEGALM_STOP_FILE"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$1"
}
