#!/usr/bin/env bash
# ST-MEM pretraining on a Cloud TPU VM (one host or a pod slice): every worker runs the same command, and
# jax.distributed.initialize() finds the workers from the TPU metadata (STMEM_DISTRIBUTED=1; stmem.distributed).
#
#   TPU_NAME=stmem-v4-32 ZONE=us-central2-b WORKDIR=/mnt/runs/base launch/tpu_vm.sh \
#       --config.data.source=prepared --config.data.data_dir=/mnt/tfds --config.data.name=cinc
#
# Variables (read on this machine; the command is built here and run on every worker):
#   TPU_NAME, ZONE   the TPU VM (required); PROJECT optional (gcloud's default project otherwise)
#   WORKDIR          run folder shared by all workers (required): a gs://bucket/run URL (stmem[gcs] installed on the
#                    workers; docs/cloud.md) or a filesystem every worker mounts (Filestore/NFS)
#   DATA_BUCKET      optional gs://bucket[/folder] of prepared data, mounted read-only with gcsfuse on every worker
#                    before the run (ArrayRecord reads local files): pass --config.data.data_dir=$DATA_MOUNT
#   DATA_MOUNT       where the workers mount it (default /tmp/stmem-data; a mount already there is kept)
#   GCSFUSE_FLAGS    gcsfuse flags besides -o ro and --only-dir (default: --implicit-dirs and a file cache in
#                    /tmp/gcsfuse-cache, so that shuffled reads hit local copies after the first epoch)
#   REPO_DIR         the stmem checkout on the workers (default ~/stmem; copy or clone it there first)
#   CONFIG           default configs/pretrain.py:base
#   PYTHON           interpreter on the workers (default: chosen there by launch/python.sh: the active
#                    environment's python that can import stmem; jax[tpu] and stmem's dependencies installed)
#   SETUP            optional command run first on every worker, e.g. "git -C ~/stmem pull"
#   STMEM_HEARTBEAT_TIMEOUT   passed on to the workers when set (default there 60 s)
# Arguments after the script name are passed to launch/pretrain.py (--config.* overrides).
# Preemption (spot / maintenance) sends SIGTERM: every worker saves at the same step and exits 75 (preempted; 0 is
# done, anything else a failure: stmem/entry.py); rerun this script to resume. To rerun until done while the VM is
# there:  until launch/tpu_vm.sh "$@"; do s=$?; ((s == 75)) || exit $s; done
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
: "${WORKDIR:?set WORKDIR to a run folder every worker sees}"
REPO_DIR="${REPO_DIR:-~/stmem}"
CONFIG="${CONFIG:-configs/pretrain.py:base}"

env_vars="STMEM_DISTRIBUTED=1${STMEM_HEARTBEAT_TIMEOUT:+ STMEM_HEARTBEAT_TIMEOUT=$STMEM_HEARTBEAT_TIMEOUT}"
args="$(printf '%q ' --config "$CONFIG" --workdir "$WORKDIR" "$@")"
mount=""
if [[ -n "${DATA_BUCKET:-}" ]]; then
  [[ "$DATA_BUCKET" == gs://?* ]] || { echo "DATA_BUCKET must be a gs://bucket[/folder] URL" >&2; exit 2; }
  data_path="${DATA_BUCKET#gs://}"; data_path="${data_path%/}"
  data_bucket="${data_path%%/*}"; data_dir=""
  [[ "$data_path" == */* ]] && data_dir="${data_path#*/}"
  DATA_MOUNT="${DATA_MOUNT:-/tmp/stmem-data}"
  cache="--cache-dir=/tmp/gcsfuse-cache --file-cache-max-size-mb=-1 --file-cache-cache-file-for-range-read=true"
  GCSFUSE_FLAGS="${GCSFUSE_FLAGS:---implicit-dirs $cache}"
  at="$(printf %q "$DATA_MOUNT")"
  mount="mkdir -p $at && { mountpoint -q $at || gcsfuse -o ro $GCSFUSE_FLAGS"
  mount+="${data_dir:+ --only-dir $(printf %q "$data_dir")} $(printf %q "$data_bucket") $at; } && "
fi
remote="cd $REPO_DIR && ${SETUP:+$SETUP && }${mount}${PYTHON:+export PYTHON=$(printf %q "$PYTHON") && }"
remote+="source launch/python.sh && choose_python"
remote+=" && $env_vars \"\$PYTHON\" launch/pretrain.py $args"
project=()
[[ -n "${PROJECT:-}" ]] && project=(--project "$PROJECT")
echo "on every worker of $TPU_NAME: $remote" >&2
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${project[@]+"${project[@]}"} --worker=all --command "$remote"
