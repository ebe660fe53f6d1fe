#!/usr/bin/env bash
# Build the container image for real and smoke-test it. By hand, as root, on Debian;
# not part of .ci/run (the first run needs a debootstrap base, about a minute):
#
#   sudo bash .ci/image-smoke.sh [--remove-image] [--remove-base] [--rebuild-base] [--no-cache]
#
#   --remove-image   remove the wsproxy image at the end (default: keep it)
#   --remove-base    remove the debootstrap base image at the end (default: keep it,
#                    the next run reuses it)
#   --rebuild-base   make the base again even if it exists
#   --no-cache       build the wsproxy image without podman's layer cache
#
# No container registry is reachable from the machines this runs on, so the base is
# made from Debian's own packages: debootstrap (python3, python3-venv, ca-certificates)
# imported with `podman import` as $BASE_IMAGE, and the Dockerfile's PYTHON_IMAGE build
# argument points at it. Then, on loopback only (--network host, every address is
# 127.0.0.1):
#   1. an echo WebSocket upstream starts on the host (the project's .venv, websockets);
#   2. the image runs with the chart's securityContext (charts/wsproxy/values.yaml):
#      read-only root with a tmpfs at /tmp (the chart's emptyDir), user 10001:10001,
#      every capability dropped, no-new-privileges, the default seccomp profile; its
#      config.yaml, written here and mounted read-only, points at the echo upstream;
#   3. a WebSocket client relays a text and a binary message through it, and /metrics on
#      the admin port (read back from that config.yaml) must count them;
#   4. SIGTERM (podman stop) must drain it and end it with exit status 0.
# Containers, the echo server and temporary files are removed on every exit.
#
# Storage is private to this script ($STATE_DIR, vfs driver, runc): nothing is changed in
# the machine's own podman store or configuration. To use the kept image afterwards:
#   podman --root $STATE_DIR/storage --runroot $STATE_DIR/run --storage-driver vfs ...
# (the script prints the exact line). Installs podman, runc and debootstrap with apt
# when they are missing; does nothing else to the machine.
#
# Environment: STATE_DIR (/var/lib/wsproxy-image-smoke), STORAGE_DRIVER (vfs),
# DEBIAN_MIRROR (http://deb.debian.org/debian), SUITE (bookworm), IMAGE
# (localhost/wsproxy:<version>), BASE_IMAGE (localhost/python-debootstrap:<suite>).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

REMOVE_IMAGE=0 REMOVE_BASE=0 REBUILD_BASE=0 NO_CACHE=()
for arg in "$@"; do
    case $arg in
        --remove-image) REMOVE_IMAGE=1 ;;
        --remove-base) REMOVE_BASE=1 ;;
        --rebuild-base) REBUILD_BASE=1 ;;
        --no-cache) NO_CACHE=(--no-cache) ;;
        -h | --help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)
STATE_DIR=${STATE_DIR:-/var/lib/wsproxy-image-smoke}
STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${SUITE:-bookworm}
IMAGE=${IMAGE:-localhost/wsproxy:$VERSION}
BASE_IMAGE=${BASE_IMAGE:-localhost/python-debootstrap:$SUITE}
CONTAINER=wsproxy-image-smoke
PY=$ROOT/.venv/bin/python

step() { printf '==> %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (debootstrap and rootful podman)"
command -v apt-get >/dev/null || die "needs a Debian-like machine (apt-get)"
[[ -n $VERSION ]] || die "no version in pyproject.toml"

# ----------------------------------------------------------------------------- tools

missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    step "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        timeout 300 apt-get update -q
        timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
fi
if [[ ! -x $PY ]]; then
    step "python3 -m venv .venv"
    python3 -m venv .venv
fi
if ! "$PY" -c 'import websockets' 2>/dev/null; then
    step "pip install websockets into .venv (the smoke test's client and echo upstream)"
    timeout 300 "$PY" -m pip install --quiet --disable-pip-version-check 'websockets>=15,<18'
fi

mkdir -p "$STATE_DIR/storage" "$STATE_DIR/run"
# The sandboxes this runs in refuse podman's default (higher) rlimits for containers.
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
PM=(podman --root "$STATE_DIR/storage" --runroot "$STATE_DIR/run"
    --storage-driver "$STORAGE_DRIVER" --runtime runc --cgroup-manager cgroupfs
    --events-backend file)
# Every podman call is bounded; the build gets its own, longer limit.
pm() { timeout 120 "${PM[@]}" "$@"; }
step "$(podman --version), $(runc --version | head -n1), storage $STORAGE_DRIVER in $STATE_DIR"

TMP=$(mktemp -d /tmp/wsproxy-image-smoke.XXXXXX)
ECHO_PID=""
cleanup() {
    local rc=$?
    set +e
    if pm container exists "$CONTAINER" 2>/dev/null; then
        timeout 60 "${PM[@]}" rm --force --time 5 "$CONTAINER" >/dev/null
    fi
    if [[ -n $ECHO_PID ]] && kill -0 "$ECHO_PID" 2>/dev/null; then
        kill "$ECHO_PID"
        wait "$ECHO_PID" 2>/dev/null
    fi
    if [[ -d $STATE_DIR/rootfs ]]; then rm -rf "$STATE_DIR/rootfs"; fi
    rm -rf "$TMP"
    if ((REMOVE_IMAGE)) && pm image exists "$IMAGE" 2>/dev/null; then
        step "remove $IMAGE"
        timeout 120 "${PM[@]}" rmi --force "$IMAGE" >/dev/null
    fi
    if ((REMOVE_BASE)) && pm image exists "$BASE_IMAGE" 2>/dev/null; then
        step "remove $BASE_IMAGE"
        timeout 120 "${PM[@]}" rmi --force "$BASE_IMAGE" >/dev/null
    fi
    # The build stage's image and older builds' layers: kept otherwise, as the cache
    # that makes the next run quick.
    if ((REMOVE_IMAGE)); then timeout 120 "${PM[@]}" image prune --force >/dev/null 2>&1; fi
    if ((rc == 0)); then step "PASS"; else printf '==> FAILED (exit %d)\n' "$rc" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# A leftover from an interrupted run would hold the name.
if pm container exists "$CONTAINER"; then timeout 60 "${PM[@]}" rm --force "$CONTAINER" >/dev/null; fi

# ------------------------------------------------------------------------------ base

if ((REBUILD_BASE)) || ! pm image exists "$BASE_IMAGE"; then
    rootfs=$STATE_DIR/rootfs
    rm -rf "$rootfs"
    step "debootstrap $SUITE (python3, python3-venv, ca-certificates) from $DEBIAN_MIRROR"
    t0=$SECONDS
    timeout 900 debootstrap --variant=minbase \
        --include=python3,python3-venv,ca-certificates,passwd \
        "$SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$TMP/debootstrap.log" 2>&1 ||
        { tail -n 20 "$TMP/debootstrap.log" >&2; die "debootstrap failed"; }
    # Where a proxy re-signs TLS (as on the machines this was written on), pip inside
    # the build must trust the same extra CAs as this host. They go into the base, so
    # an image built here trusts them too: it is a local test image, not one to push.
    shopt -s nullglob
    extra_cas=(/usr/local/share/ca-certificates/*.crt)
    shopt -u nullglob
    if ((${#extra_cas[@]})); then
        step "trust this host's extra CAs in the base: ${extra_cas[*]##*/}"
        cp "${extra_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    step "podman import -> $BASE_IMAGE"
    if pm image exists "$BASE_IMAGE"; then timeout 120 "${PM[@]}" rmi --force "$BASE_IMAGE" >/dev/null; fi
    tar -C "$rootfs" -c . |
        timeout 300 "${PM[@]}" import --change 'CMD ["python3"]' - "$BASE_IMAGE" \
            >"$TMP/import.log" 2>&1 || { cat "$TMP/import.log" >&2; die "podman import failed"; }
    rm -rf "$rootfs"
    step "base made in $((SECONDS - t0)) s"
else
    step "base $BASE_IMAGE exists (--rebuild-base to make it again)"
fi
step "base: $(pm run --rm "${ULIMITS[@]}" --network none "$BASE_IMAGE" python3 --version)," \
    "$(pm image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

# ----------------------------------------------------------------------------- build

step "podman build -t $IMAGE (PYTHON_IMAGE=$BASE_IMAGE)"
t0=$SECONDS
# --network host: pip in the build stage fetches the wheels from PyPI.
timeout 1200 "${PM[@]}" build "${ULIMITS[@]}" "${NO_CACHE[@]}" --pull=never --network host \
    --build-arg PYTHON_IMAGE="$BASE_IMAGE" --build-arg VERSION="$VERSION" \
    -t "$IMAGE" -f Dockerfile . >"$TMP/build.log" 2>&1 ||
    { tail -n 40 "$TMP/build.log" >&2; die "podman build failed"; }
build_s=$((SECONDS - t0))
grep -E 'STEP [0-9]+/[0-9]+:|Using cache|^COMMIT|^Successfully (installed|tagged)|^wsproxy [0-9]' "$TMP/build.log" |
    sed 's/^/  /' || true
size=$(pm image inspect --format '{{.Size}}' "$IMAGE")
step "built in ${build_s} s; image $IMAGE: $(awk -v s="$size" 'BEGIN{printf "%.0f MB (%d bytes)", s/1e6, s}')"
user=$(pm image inspect --format '{{.Config.User}}' "$IMAGE")
[[ $user == 10001:10001 ]] || die "image USER is '$user', expected 10001:10001"
got=$(timeout 60 "${PM[@]}" run --rm "${ULIMITS[@]}" --network none --read-only "$IMAGE" version)
step "wsproxy version in the image: $got"
[[ $got == "wsproxy $VERSION" ]] || die "expected 'wsproxy $VERSION'"

# ------------------------------------------------------------------------- smoke test

# Echo upstream on the host; it writes its port once it listens, and ends by itself.
"$PY" - "$TMP/echo.port" >"$TMP/echo.log" 2>&1 <<'EOF' &
"""Echo every message back; port 0 on 127.0.0.1; ends after 300 s at most."""
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(port))
        import os
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        await asyncio.sleep(300)

asyncio.run(main())
EOF
ECHO_PID=$!
for _ in $(seq 100); do [[ -s $TMP/echo.port ]] && break; sleep 0.1; done
[[ -s $TMP/echo.port ]] || { cat "$TMP/echo.log" >&2; die "echo upstream did not start in 10 s"; }
ECHO_PORT=$(cat "$TMP/echo.port")

# Two free ports on 127.0.0.1 for the proxy and its admin listener.
read -r LISTEN_PORT ADMIN_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

mkdir -p "$TMP/etc"
cat >"$TMP/etc/config.yaml" <<EOF
# Written by .ci/image-smoke.sh: everything on 127.0.0.1 (the container shares the
# host's network namespace).
listen: "127.0.0.1:$LISTEN_PORT"
upstream:
  url: "ws://127.0.0.1:$ECHO_PORT"
  connect_timeout: 2s
routes:
  - path: /smoke
keepalive:
  ping_interval: 2s
  pong_wait: 5s
passthrough: "off"
log:
  level: info
  format: text
admin:
  enabled: true
  listen: "127.0.0.1:$ADMIN_PORT"
shutdown:
  drain_delay: 0s
  close_spread: 0s
  grace_period: 3s
EOF
chmod 0755 "$TMP" "$TMP/etc"
chmod 0644 "$TMP/etc/config.yaml"
# The admin address is whatever the config says, not an assumed default.
ADMIN=$(timeout 60 "${PM[@]}" run --rm "${ULIMITS[@]}" --network none --read-only \
    -v "$TMP/etc:/etc/wsproxy:ro" "$IMAGE" check --config /etc/wsproxy/config.yaml |
    "$PY" -c 'import sys, yaml; a = yaml.safe_load(sys.stdin)["admin"]; print(a["listen"])')
step "wsproxy check passed in the image; upstream 127.0.0.1:$ECHO_PORT (echo), proxy 127.0.0.1:$LISTEN_PORT, admin $ADMIN"

step "podman run: read-only root, tmpfs /tmp, user 10001:10001, cap-drop ALL, no-new-privileges"
pm run -d --name "$CONTAINER" "${ULIMITS[@]}" --network host \
    --read-only --tmpfs /tmp:rw,nosuid,nodev,size=16m \
    --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges \
    -v "$TMP/etc:/etc/wsproxy:ro" "$IMAGE" >/dev/null

# The chart's securityContext, as the running process sees it.
pm inspect --format 'ReadonlyRootfs={{.HostConfig.ReadonlyRootfs}} User={{.Config.User}}' "$CONTAINER"
status=$(timeout 30 "${PM[@]}" exec "$CONTAINER" python3 -c '
import os
caps = {l.split(":")[0]: l.split()[1] for l in open("/proc/1/status") if l.startswith("Cap") or l.startswith("NoNewPrivs")}
uid = os.stat("/proc/1").st_uid
print(f"pid 1 uid={uid}", " ".join(f"{k}={v}" for k, v in sorted(caps.items())))
try:
    open("/opt/wsproxy/probe", "w")
except OSError as e:
    print("write /opt/wsproxy:", e.strerror)
open("/tmp/probe", "w").close()
print("write /tmp: ok")')
echo "$status"
grep -q 'pid 1 uid=10001 ' <<<"$status" || die "wsproxy does not run as uid 10001"
grep -q 'CapEff=0000000000000000' <<<"$status" || die "wsproxy has effective capabilities"
grep -q 'NoNewPrivs=1' <<<"$status" || die "no-new-privileges is not set"
grep -q 'write /opt/wsproxy: Read-only file system' <<<"$status" || die "root filesystem is writable"

# Relay, then scrape: every wait is bounded inside the script.
timeout 60 "$PY" - "127.0.0.1:$LISTEN_PORT" "$ADMIN" <<'EOF'
import sys, time, urllib.request
from websockets.sync.client import connect

proxy, admin = sys.argv[1], sys.argv[2]

def get(path):
    try:
        with urllib.request.urlopen(f"http://{admin}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except OSError:
        return None, ""

deadline = time.monotonic() + 30
while get("/readyz")[0] != 200:
    if time.monotonic() > deadline:
        sys.exit(f"/readyz on {admin} not 200 within 30 s")
    time.sleep(0.2)
print(f"/healthz {get('/healthz')[0]}, /readyz 200")

text, blob = "hello through the image", bytes(range(256)) * 64
# No permessage-deflate: the byte counters then match the payload sizes.
with connect(f"ws://{proxy}/smoke", open_timeout=10, close_timeout=5, compression=None) as ws:
    ws.send(text)
    assert ws.recv(timeout=10) == text, "text message not echoed"
    ws.send(blob)
    assert ws.recv(timeout=10) == blob, "binary message not echoed"
print(f"relayed: text {len(text)} B and binary {len(blob)} B echoed back through the proxy")

def sample(body, name, **labels):
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in body.splitlines():
        if line.startswith(f"{name}{{") and all(p in line for p in want.split(",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0

deadline = time.monotonic() + 10
while True:
    status, body = get("/metrics")
    frames_in = sample(body, "wsproxy_frames_total", route="/smoke", direction="in")
    frames_out = sample(body, "wsproxy_frames_total", route="/smoke", direction="out")
    bytes_in = sample(body, "wsproxy_bytes_total", route="/smoke", direction="in")
    bytes_out = sample(body, "wsproxy_bytes_total", route="/smoke", direction="out")
    closes = sample(body, "wsproxy_close_codes_total", route="/smoke", code="1000")
    payload = len(text) + len(blob)
    if (status == 200 and frames_in >= 2 and frames_out >= 2 and closes >= 1
            and bytes_in >= payload and bytes_out >= payload):
        break
    if time.monotonic() > deadline:
        print(body)
        sys.exit("/metrics did not count the relayed frames, bytes and close within 10 s")
    time.sleep(0.2)
print("/metrics:")
for line in body.splitlines():
    name = line.split("{", 1)[0].split(" ", 1)[0]
    if name.startswith("wsproxy_") and not name.endswith(("_created", "_bucket")) \
            and not line.endswith(" 0.0"):
        print("  " + line)
EOF

step "podman stop (SIGTERM; drain_delay 0s, grace_period 3s)"
t0=$SECONDS
timeout 60 "${PM[@]}" stop --time 15 "$CONTAINER" >/dev/null
code=$(pm inspect --format '{{.State.ExitCode}}' "$CONTAINER")
step "stopped in $((SECONDS - t0)) s, exit status $code; its log:"
pm logs "$CONTAINER" 2>&1 | sed 's/^/  /'
[[ $code == 0 ]] || die "wsproxy exited with $code after SIGTERM, expected 0"
timeout 60 "${PM[@]}" rm "$CONTAINER" >/dev/null

if ((!REMOVE_IMAGE)); then
    step "image kept; use it with: podman --root $STATE_DIR/storage --runroot $STATE_DIR/run" \
        "--storage-driver $STORAGE_DRIVER run ${ULIMITS[*]} ... $IMAGE"
fi
pm images --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' "$IMAGE" | sed 's/^/  /'
pm images --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' "$BASE_IMAGE" | sed 's/^/  /'
