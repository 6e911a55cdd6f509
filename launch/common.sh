#!/usr/bin/env bash
# Shared by the launch scripts (sourced): quoting, dry runs and workdir checks.
#   DRY_RUN=1 bash launch/<script>.sh ...   prints every command it would run, one per line, and runs none.

# Every argument shell-quoted (single quotes where needed), space-separated: safe to paste into a shell or to pass
# through ssh --command.
quote() {
  local out="" a q="'"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$a "
    else
      out+="'${a//$q/$q\\$q$q}' "
    fi
  done
  printf '%s' "${out% }"
}

# Run a command, or print it when DRY_RUN=1 (the exact argv, quoted).
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "$(quote "$@")"
  else
    "$@"
  fi
}

# Run a command in the background (or print it, prefixed with its environment, under DRY_RUN=1); sets PID.
run_bg() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "$(quote "$@") &"
    PID=""
  else
    "$@" &
    PID=$!
  fi
}

# Several hosts must share one workdir: an object-store URL (gs://...), or a shared file system when the caller says
# so with SHARED_FS=1. A local path would give every host its own checkpoints, lost on preemption.
require_shared_workdir() {
  case "$1" in
    gs://*|s3://*|file://*) ;;
    *) if [[ "${SHARED_FS:-0}" != 1 ]]; then
         echo "launch: error: WORKDIR=$1 is not a bucket URL; every host needs the same workdir: use gs://... or set" \
              "SHARED_FS=1 if $1 is on a shared file system" >&2
         exit 2
       fi ;;
  esac
}
