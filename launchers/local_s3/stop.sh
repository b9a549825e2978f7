#!/usr/bin/env bash
# Stop the object store started by start.sh (its data stays in $DIST_CLM_S3_DIR unless --wipe).
set -uo pipefail
DIR=${DIST_CLM_S3_DIR:-/tmp/dist-clm-s3}
if [[ -s $DIR/weed.pid ]]; then
  pid=$(cat "$DIR/weed.pid")
  kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 -- "-$pid" 2>/dev/null
  rm -f "$DIR/weed.pid"
fi
[[ ${1:-} == --wipe ]] && rm -rf "$DIR"
[[ ${1:-} == --quiet ]] || echo "[local-s3] stopped"
