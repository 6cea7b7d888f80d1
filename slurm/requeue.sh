# shellcheck shell=bash
# Sourced by array.sbatch and multinode.sbatch: run the training step, pass SLURM's signals on to
# it, and requeue the job when the training stopped for a preemption. This is the ONE requeue
# mechanism of the plain sbatch path; the training only checkpoints (sectional_moe.callbacks.preemption).
#
# * The preemption signal is $SUBMITIT_PREEMPT_SIGNAL (default USR2), as for submitit and the
#   training. SLURM sends it to this script with `#SBATCH --signal=B:USR2@120`; to change it, set
#   the variable AND pass e.g. `sbatch --signal=B:USR1@120`. A USR2 that still arrives (the
#   #SBATCH default) is passed on as the configured signal, so it is never lost.
# * SIGTERM (preemption with a grace time, scancel, scontrol requeue, time limit) is passed on too.
# * The training saves checkpoints/last.ckpt at the next step and exits with 143. Then the job is
#   requeued if SLURM still lists it as RUNNING; in any other state (COMPLETING after scancel, a
#   time limit or `scontrol requeue`) SLURM is ending or requeueing it itself, and a requeue here
#   would bring a cancelled job back.

SMOE_EXIT_PREEMPTED=143  # = sectional_moe.env.EXIT_PREEMPTED

_smoe_child=
_smoe_signalled=

_smoe_forward() {  # _smoe_forward SIGNAL_TO_SEND SIGNAL_RECEIVED
  _smoe_signalled=$2
  echo "[$(date +%FT%T)] got SIG$2: passing SIG$1 to the training (checkpoint at the next step)"
  [ -n "$_smoe_child" ] && kill -s "$1" "$_smoe_child" 2>/dev/null   # srun hands it to every rank
  return 0
}

# smoe_run JOB_TO_REQUEUE COMMAND...: run COMMAND (an srun line) in the background, so that the
# traps run as soon as a signal arrives; return its exit status, or 0 after requeueing the job.
smoe_run() {
  local requeue_id=$1 sig rc state
  shift
  sig=${SUBMITIT_PREEMPT_SIGNAL:-USR2}
  sig=${sig#SIG}
  if ! kill -l "$sig" >/dev/null 2>&1; then
    echo "error: SUBMITIT_PREEMPT_SIGNAL=$sig is not a signal name; use USR2 (or unset it)" >&2
    return 2
  fi
  trap "_smoe_forward $sig USR2" USR2
  trap "_smoe_forward $sig $sig" "$sig"
  trap "_smoe_forward TERM TERM" TERM

  "$@" &
  _smoe_child=$!
  while :; do
    wait "$_smoe_child"
    kill -0 "$_smoe_child" 2>/dev/null || break   # still running: a trapped signal only interrupted wait
  done
  wait "$_smoe_child"   # its own exit status (bash keeps it), not an interrupted wait's 128+n
  rc=$?

  if [ "$rc" != 0 ] && { [ "$rc" = "$SMOE_EXIT_PREEMPTED" ] || [ -n "$_smoe_signalled" ]; }; then
    state=$(squeue -h -j "$requeue_id" -o %T 2>/dev/null)   # <array>_<task>: a bare array id names every task
    if [ "$state" = RUNNING ]; then
      echo "[$(date +%FT%T)] training stopped for a preemption (exit $rc): requeueing $requeue_id"
      scontrol requeue "$requeue_id" && return 0
      echo "error: scontrol requeue $requeue_id failed; the job ends here (a rerun resumes from last.ckpt)" >&2
    else
      echo "[$(date +%FT%T)] training stopped (exit $rc); SLURM lists the job as ${state:-unknown}: not requeued here (cancelled, timed out or requeued by SLURM)"
    fi
  fi
  return "$rc"
}
