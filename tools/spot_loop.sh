#!/usr/bin/env bash
# Re-run a training command until its run is finished. On a spot VM, start it at boot (systemd unit, cron @reboot,
# user data) with the run folder on a disk that outlives the VM; each run resumes where the last one stopped.
#   tools/spot_loop.sh python train.py -c recipes/rn50_130ep.yaml
#   tools/spot_loop.sh torchrun --nproc_per_node=8 train.py -c recipes/rn50_130ep.yaml
# Exit codes of train.py: 0 finished (also at once when re-run after the end), 2 bad input, 3 non-finite loss: these
# end the loop. 75 (stopped by a signal after saving), 1 (a crash; torchrun reports any failure as 1) and 128+N
# (killed) resume after RETRY_DELAY seconds, at most MAX_ATTEMPTS times.
set -u
attempts=0
while true; do
  "$@"
  rc=$?
  case $rc in
    0|2|3) exit $rc ;;
  esac
  attempts=$((attempts + 1))
  if [ "$attempts" -ge "${MAX_ATTEMPTS:-100}" ]; then
    echo "spot_loop: giving up after $attempts attempts (exit code $rc)" >&2
    exit $rc
  fi
  echo "spot_loop: exit code $rc, resuming in ${RETRY_DELAY:-10} s (attempt $attempts)" >&2
  sleep "${RETRY_DELAY:-10}"
done
