#!/usr/bin/env bash
# `make docker-check`: build docker/Dockerfile.cpu for real, serve it, kill a TP worker inside the running container
# and check the recovery from outside (not part of `make test`: it needs a Docker engine and builds several GB).
#
# Works with no registry reachable except the package registries: a Docker engine is started if none answers
# (`dockerd`, as root), the base image is made from Debian's own packages with debootstrap (sglang-ft-base:bookworm,
# once), and the build reaches pip and apt over the host's network. The container runs with `--network host`, the
# server bound to 127.0.0.1 on a free port. It prints the date, the build time, the image size and the result.
#
# Environment: SGLANG_FT_IMAGE (sglang-ft:cpu-check), SGLANG_FT_BASE_IMAGE (sglang-ft-base:bookworm; any other value
# is used as it is, e.g. python:3.11-slim-bookworm where a registry answers), DOCKER_STORAGE_DRIVER (overlay2 where
# the kernel has overlayfs, else vfs), DEBIAN_MIRROR, SGLANG_FT_SERVER_LOCK (the lock held while the server runs).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${SGLANG_FT_IMAGE:-sglang-ft:cpu-check}
BASE=${SGLANG_FT_BASE_IMAGE:-sglang-ft-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOCK=${SGLANG_FT_SERVER_LOCK:-/tmp/sglang-ft-server.lock}
WORK=${SGLANG_FT_DOCKER_WORK:-/tmp/sglang-ft-docker}
CONTAINER=sglang-ft-check-$$
TP=4
mkdir -p "$WORK"

log() { echo "[docker-check $(date -u +%H:%M:%S)] $*"; }
die() { log "FAIL: $*"; echo "result: FAIL ($*)"; exit 1; }

DOCKER=$(command -v docker || true)
[ -n "$DOCKER" ] || die "no docker client: apt-get install -y docker.io debootstrap"

start_engine() {
    if "$DOCKER" info >/dev/null 2>&1; then return; fi
    command -v dockerd >/dev/null || die "no Docker engine answers and dockerd is not installed (apt-get install docker.io)"
    local driver=${DOCKER_STORAGE_DRIVER:-$(grep -qw overlay /proc/filesystems && echo overlay2 || echo vfs)}
    log "starting dockerd (storage driver $driver, log $WORK/dockerd.log; stopped at the end)"
    # No bridge and no iptables: containers and builds use the host's network, which is all this machine has.
    nohup dockerd --storage-driver "$driver" --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 60); do
        if "$DOCKER" info >/dev/null 2>&1; then return; fi
        sleep 1
    done
    die "dockerd did not answer within 60 s (see $WORK/dockerd.log)"
}

make_base() {
    if "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then return; fi
    [ "$BASE" = sglang-ft-base:bookworm ] || return 0  # a registry image: the build pulls it
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    local rootfs="$WORK/rootfs"
    log "making $BASE with debootstrap from $MIRROR"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 || die "debootstrap failed (see $WORK/debootstrap.log)"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    # This host's own certificate authorities (a TLS proxy in front of the registries, say) go into the base too,
    # and pip is told to use the system's bundle, not its own copy of certifi's.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
    fi
    tar -C "$rootfs" -c . | "$DOCKER" import --change 'CMD ["/bin/bash"]' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' - "$BASE" >/dev/null
    rm -rf "$rootfs"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

http() { curl -sS --max-time 30 "$@"; }

status_field() {  # status_field PORT EXPR: a field of GET /ft/status (EXPR in Python, `s` the parsed body)
    http "http://127.0.0.1:$1/ft/status" | python3 -c "import json, sys; s = json.load(sys.stdin); print($2)"
}

STARTED_DOCKERD=""
cleanup() {
    "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1 || true
    if [ -n "$STARTED_DOCKERD" ]; then kill "$STARTED_DOCKERD" 2>/dev/null || true; fi  # the engine this run started
}
trap cleanup EXIT

start_engine
make_base

log "building $IMAGE from docker/Dockerfile.cpu on $BASE (log $WORK/build.log)"
build_start=$(date +%s)
# The classic builder: Dockerfile.cpu needs nothing of BuildKit's, and it works with any client (a client without
# the buildx plugin refuses DOCKER_BUILDKIT=1) and sees the local base image without a registry.
DOCKER_BUILDKIT=0 nice -n 19 "$DOCKER" build --network host --build-arg "BASE_IMAGE=$BASE" \
    -f "$ROOT/docker/Dockerfile.cpu" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 \
    || { tail -n 30 "$WORK/build.log"; die "docker build failed (see $WORK/build.log)"; }
build_s=$(( $(date +%s) - build_start ))
size_bytes=$("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE")
log "built in ${build_s} s, $((size_bytes / 1024 / 1024)) MiB"

# Serving competes with every other sglang-ft server on this machine for the cores: one at a time.
exec 9>"$LOCK"
log "waiting for $LOCK"
flock 9
PORT=$(free_port)
log "serving on 127.0.0.1:$PORT (container $CONTAINER)"
"$DOCKER" run -d --name "$CONTAINER" --network host --shm-size 1g -e HF_HUB_OFFLINE=1 "$IMAGE" \
    python -m sglang.launch_server --model-path /models/tiny-llama --tp-size "$TP" --ft \
    --host 127.0.0.1 --port "$PORT" >/dev/null

for _ in $(seq 600); do
    if [ "$(http -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health" 2>/dev/null)" = 200 ]; then break; fi
    [ "$("$DOCKER" inspect --format '{{.State.Running}}' "$CONTAINER")" = true ] \
        || { "$DOCKER" logs --tail 40 "$CONTAINER"; die "the container exited before /health answered"; }
    sleep 1
done
wait_state() {  # wait_state WANT SECONDS: poll /ft/status until (tp_size, epoch) reads WANT
    for _ in $(seq "$2"); do
        state=$(status_field "$PORT" "s['tp_size'], s['epoch']" 2>/dev/null || true)
        if [ "$state" = "$1" ]; then return 0; fi
        sleep 1
    done
    return 1
}
wait_state "$TP 0" 60 || die "not at TP $TP, epoch 0 after start (last: $state; $(http "http://127.0.0.1:$PORT/ft/status" | head -c 300))"
log "healthy at TP $TP"

# A real fault: SIGKILL from outside the server, to the scheduler of the last rank (its pid in /ft/status is the
# container's pid namespace's, so `docker exec` reaches it).
victim=$(status_field "$PORT" "[w['pid'] for w in s['workers'] if w['rank'] == $((TP - 1))][0]")
log "kill -9 $victim (rank $((TP - 1))) inside the container"
"$DOCKER" exec "$CONTAINER" sh -c "kill -9 $victim"  # the shell's kill: the image may have no procps

wait_state "$((TP - 1)) 1" 180 \
    || { "$DOCKER" logs --tail 40 "$CONTAINER"; die "no regroup to TP $((TP - 1)), epoch 1 (last: $state)"; }
log "regrouped: TP $((TP - 1)), epoch 1"

reply=$(http -H 'Content-Type: application/json' "http://127.0.0.1:$PORT/generate" \
    -d '{"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}')
tokens=$(echo "$reply" | python3 -c "import json, sys; r = json.load(sys.stdin); print(r['meta_info']['completion_tokens'])") \
    || die "the request after the regroup failed: $reply"
[ "$tokens" = 8 ] || die "the request after the regroup returned $tokens tokens, not 8: $reply"
"$DOCKER" stop --time 30 "$CONTAINER" >/dev/null
flock -u 9

echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "build: ${build_s} s (base $BASE, $("$DOCKER" info --format '{{.Driver}}') storage)"
echo "image: $IMAGE, $size_bytes bytes ($((size_bytes / 1024 / 1024)) MiB)"
echo "result: PASS (TP $TP -> $((TP - 1)) at epoch 1 after kill -9 of rank $((TP - 1))'s scheduler; a request after it returned $tokens tokens)"
