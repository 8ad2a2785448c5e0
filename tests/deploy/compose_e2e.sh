#!/usr/bin/env bash
# `docker compose up` end to end, as a user runs it (`make compose-test`): build the image, bring up memd, worker
# and gateway on the demo model, talk to the gateway with the official `openai` client (chat and stream), run
# `moeinf admin stats` in the memd container, crash the worker and check that compose brings it back, scale to two
# workers on the one memd (`up -d --scale worker=2`: concurrent requests reach both; one killed, the other serves),
# stop the stack and check what is left: the EAMC only.
#
# Prints "skipped: no Docker engine" and exits 0 where no engine answers. Knobs (environment):
#   MOEINF_BASE_IMAGE  the Dockerfile's BASE_IMAGE (default python:3.11-slim). A tag moeinf-base:* that does not
#                      exist is built by tests/deploy/base_image.sh (debootstrap; for machines with no registry).
#   MOEINF_TORCH_WHEELS  a directory holding the torch wheel and its dependencies (`pip download torch==2.13.0
#                      -d DIR`): served on 127.0.0.1 as the build's TORCH_INDEX, for builds that cannot reach
#                      download.pytorch.org. Unset: the Dockerfile's default index. Served on port
#                      MOEINF_E2E_INDEX_PORT (default 38127: the index URL is part of the build cache's key).
#   MOEINF_E2E_IMAGE   the image tag to build and run (default moeinf:e2e)
#   MOEINF_E2E_PYTHON  a python with moeinf's dependencies and `openai` (default: .venv/bin/python, else python3)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
T0=$(date +%s)
say() { printf '[%4ds] %s\n' $(( $(date +%s) - T0 )) "$*"; }
fail() { say "FAIL: $*"; exit 1; }
trap 'rc=$?; say "FAIL: line $LINENO exited $rc"' ERR  # a command that set -e ends the script on: never silently

if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then echo "skipped: no Docker engine"; exit 0; fi
if docker compose version >/dev/null 2>&1; then DC=(docker compose)
elif command -v docker-compose >/dev/null; then DC=(docker-compose)
else echo "skipped: no docker compose (v2 plugin) nor docker-compose (v1)"; exit 0; fi
PYTHON=${MOEINF_E2E_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PYTHON" -c 'import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ("openai", "torch"))))' || fail "$PYTHON lacks openai or torch (make install)"

PROJECT=moeinfe2e  # letters only: v1 and v2 name the volume alike (moeinfe2e_state)
IMAGE=${MOEINF_E2E_IMAGE:-moeinf:e2e}
BASE=${MOEINF_BASE_IMAGE:-python:3.11-slim}
WORK=$(mktemp -d /tmp/moeinf-e2e.XXXXXX)
INDEX_PID=""
dc() { "${DC[@]}" -p "$PROJECT" -f compose.yaml "$@"; }
cleanup() {
  set +e
  [ -n "${WITNESS:-}" ] && docker kill "$WITNESS" >/dev/null 2>&1
  if [ "${KEEP:-0}" != 1 ]; then dc down -v --remove-orphans >/dev/null 2>&1; fi
  [ -n "$INDEX_PID" ] && kill "$INDEX_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
say "compose: ${DC[*]} ($("${DC[@]}" version --short 2>/dev/null || "${DC[@]}" version | head -1))"

# ---------------------------------------------------------------- the image
if [[ "$BASE" == moeinf-base:* ]] && ! docker image inspect "$BASE" >/dev/null 2>&1; then
  say "building the base image $BASE from Debian's packages"
  tests/deploy/base_image.sh "$BASE"
fi
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE")
if [ -n "${MOEINF_TORCH_WHEELS:-}" ]; then
  # a PEP 503 index of the given wheels: simple/<normalized name>/<wheel>; pip trusts http on loopback
  for whl in "$MOEINF_TORCH_WHEELS"/*.whl; do
    name=$(basename "$whl" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
    mkdir -p "$WORK/index/simple/$name" && ln -s "$(readlink -f "$whl")" "$WORK/index/simple/$name/"
  done
  PORT=${MOEINF_E2E_INDEX_PORT:-38127}  # fixed: TORCH_INDEX is part of the build cache's key
  "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$PORT" >"$WORK/index.log" 2>&1 &
  INDEX_PID=$!
  sleep 1
  kill -0 "$INDEX_PID" 2>/dev/null || { cat "$WORK/index.log"; fail "cannot serve the wheels on port $PORT"; }
  BUILD_ARGS+=(--build-arg "TORCH_INDEX=http://127.0.0.1:$PORT/simple")
fi
say "docker build -t $IMAGE (BASE_IMAGE=$BASE)"
docker build -q --network host "${BUILD_ARGS[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log"; fail "docker build"; }
say "built $(docker image inspect -f '{{.Id}}' "$IMAGE" | cut -c1-19)"

# ---------------------------------------------------------------- up
mkdir -p "$WORK/model"
PYTHONPATH="$ROOT" "$PYTHON" -m services.cli demo-model "$WORK/model/demo" >"$WORK/demo.log" 2>&1 \
  || { cat "$WORK/demo.log"; fail "moeinf demo-model"; }
chmod -R a+rX "$WORK"  # the containers run as uid 1000; mktemp made $WORK 0700
# an API key once the gateway has --api-key (MOEINF_API_KEY; compose passes it through): /v1 then needs it
E2E_KEY=""
# (the help in a variable first: `| grep -q` can close the pipe early, and pipefail then calls that a failure)
GW_HELP=$(docker run --rm --entrypoint moeinf "$IMAGE" gateway --help 2>/dev/null || true)
if grep -q -- --api-key <<<"$GW_HELP"; then
  E2E_KEY=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')
fi
export MOEINF_API_KEY="$E2E_KEY"
GW_PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export MOEINF_IMAGE="$IMAGE" MOEINF_MODEL_DIR="$WORK/model/demo" MOEINF_PORT="$GW_PORT" \
       MOEINF_EXPERT_MEMORY=64MiB MOEINF_SHM_SIZE=320m MOEINF_BASE_IMAGE="$BASE"
dc down -v --remove-orphans >/dev/null 2>&1 || true  # a previous run's leftovers
say "${DC[*]} up -d (demo model, 64MiB pool, gateway on 127.0.0.1:$GW_PORT)"
dc up -d --no-build 2>&1 | sed 's/^/    /' || { dc logs --tail 40; fail "compose up"; }

cid() { dc ps -q "$1"; }  # every container of the service (one line each: worker has several once scaled)
health() {  # SERVICE: each container's health, one word a line
  local c
  for c in $(cid "$1"); do
    docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$c"
  done
}
wait_healthy() {  # SERVICE SECONDS [REPLICAS, default 1]: exactly REPLICAS containers, all healthy
  local deadline=$(( $(date +%s) + $2 )) want
  want=$(printf 'healthy\n%.0s' $(seq "${3:-1}"))
  until [ "$(health "$1" 2>/dev/null)" = "$want" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { dc logs --tail 40 "$1"; fail "$1 not healthy within $2 s"; }
    sleep 1
  done
}
for s in memd worker gateway; do wait_healthy "$s" 300; done
say "memd, worker, gateway: healthy"

client() {  # one chat and one stream through the published port with the official client
  "$PYTHON" - "$GW_PORT" "${E2E_KEY:-unused}" <<'EOF'
import sys
import openai
c = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key=sys.argv[2], timeout=120, max_retries=0)
model = c.models.list().data[0].id
r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8,
                              temperature=0)
assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("length", "stop"), r
chunks = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to five"}],
                                        max_tokens=8, temperature=0, stream=True))
text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
assert len(chunks) >= 3 and finish in (["length"], ["stop"]), chunks
print(f"    model {model}: chat {r.usage.completion_tokens} tokens, stream {len(chunks)} chunks ({finish[0]})")
EOF
}
client || fail "requests through the gateway"
say "openai client: chat + stream OK"
if [ -n "$E2E_KEY" ]; then
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GW_PORT/v1/models")
  [ "$code" = 401 ] || fail "MOEINF_API_KEY is set, yet /v1/models without a key answered $code"
  say "API key: /v1 without the key answers 401"
else
  say "API key: not tested (this gateway has no --api-key)"
fi

dc exec -T memd moeinf admin stats >"$WORK/stats.txt" 2>&1 || { cat "$WORK/stats.txt"; fail "admin stats"; }
head -4 "$WORK/stats.txt" | sed 's/^/    /'
say "moeinf admin stats in the memd container: OK"
SHM_BEFORE=$(dc exec -T memd ls /dev/shm | tr -d '\r' | sort | tr '\n' ' ')
say "memd's /dev/shm: $SHM_BEFORE"

# ---------------------------------------------------------------- the worker dies; the restart policy brings it back
WORKER=$(cid worker)
RESTARTS=$(docker inspect -f '{{.RestartCount}}' "$WORKER")
WPID=$(docker inspect -f '{{.State.Pid}}' "$WORKER")
kill -KILL "$WPID"  # a crash (OOM kill, segfault): `docker kill` would be an operator's stop, not restarted
say "killed the worker (host pid $WPID, SIGKILL)"
deadline=$(( $(date +%s) + 120 ))
until [ "$(docker inspect -f '{{.RestartCount}}' "$WORKER")" -gt "$RESTARTS" ]; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "the worker was not restarted"
  sleep 1
done
wait_healthy worker 300
wait_healthy gateway 120
say "worker restarted by the restart policy (restarts: $(docker inspect -f '{{.RestartCount}}' "$WORKER")), healthy"
client || fail "requests after the worker restart"
say "openai client after the restart: OK"
SHM_AFTER=$(dc exec -T memd ls /dev/shm | tr -d '\r' | sort | tr '\n' ' ')
[ "$SHM_AFTER" = "$SHM_BEFORE" ] || fail "memd's /dev/shm changed across the worker restart: $SHM_AFTER"
say "memd's /dev/shm unchanged across the worker restart"

# `docker kill` is an operator's stop: Docker does not restart it (a crash, above, is); `up -d` starts it again,
# here together with a second replica: `--scale worker=2`, two workers on the one memd (one pool)
docker kill "$WORKER" >/dev/null
sleep 3
[ "$(docker inspect -f '{{.State.Status}}' "$WORKER")" = exited ] || fail "docker kill: the worker was restarted?"
say "docker kill of the worker: it stays stopped; ${DC[*]} up -d --scale worker=2"
dc up -d --no-build --scale worker=2 2>&1 | sed 's/^/    /'
wait_healthy worker 300 2
wait_healthy gateway 120
[ "$(docker inspect -f '{{.State.Status}}' "$WORKER")" = running ] || fail "up -d did not start the killed worker again"
say "the killed worker is back and a second one runs: $(cid worker | wc -l) workers, healthy"

# ---------------------------------------------------------------- two workers on the one memd
# each serves worker-<its host name>.sock in the state volume; the gateway links every worker-*.sock
SOCKS=$(dc exec -T memd sh -c 'cd /state && ls worker-*.sock' | tr -d '\r' | sort | tr '\n' ' ')
[ "$(wc -w <<<"$SOCKS")" = 2 ] || fail "the state volume should hold two worker sockets: $SOCKS"
say "worker sockets: $SOCKS"
curl -sf "http://127.0.0.1:$GW_PORT/health" >/dev/null || fail "gateway /health with two workers"
burst() {  # N_REQUESTS WORKERS_EXPECTED: concurrent chats; per-worker counters from the gateway's /metrics
  "$PYTHON" - "$GW_PORT" "${E2E_KEY:-unused}" "$@" <<'EOF'
import concurrent.futures, re, sys, urllib.request, uuid
import openai
port, key, n, expect = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def counts():
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {w: float(v) for w, v in re.findall(r'^moeinf_gateway_worker_requests_total\{worker="([^"]+)"\} (\S+)$',
                                                 text, re.M)}
c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=180, max_retries=0)
model = c.models.list().data[0].id
tag = uuid.uuid4().hex[:8]  # new users in every burst: the gateway's affinity would send a known one back
def one(i):  # each its own user and prompt: no affinity between them, least outstanding tokens decides
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Request {i}: say something"}],
                                  max_tokens=16, temperature=0, user=f"e2e-{tag}-{i}")
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("length", "stop"), r
    return r.usage.completion_tokens
before = counts()
with concurrent.futures.ThreadPoolExecutor(n) as pool:
    tokens = list(pool.map(one, range(n)))
after = counts()
served = {w: int(after[w] - before.get(w, 0)) for w in after if after[w] > before.get(w, 0)}
print(f"    {n} concurrent chats, {sum(tokens)} tokens; requests per worker: "
      + ", ".join(f"{w}={k}" for w, k in sorted(served.items())))
assert sum(served.values()) == n, (before, after)
assert len(served) == expect, f"{len(served)} workers served, expected {expect}: {served}"
EOF
}
burst 8 2 || fail "8 concurrent requests on two workers: both should serve some"
say "two workers: the gateway spread 8 concurrent requests over both"

# one of the two is killed: the other serves everything; then `up -d` brings it back
WORKERS=$(cid worker)
VICTIM=${WORKERS%%$'\n'*}  # the first (not `| head -1`: under pipefail its SIGPIPE to compose fails the script)
VICTIM_SOCK="worker-$(docker inspect -f '{{.Config.Hostname}}' "$VICTIM").sock"
docker kill "$VICTIM" >/dev/null
say "docker kill of one worker ($VICTIM_SOCK)"
burst 6 1 || fail "requests with one of two workers killed"
client || fail "chat + stream with one of two workers killed"
say "one worker killed: requests succeed, all on the other"
dc up -d --no-build --scale worker=2 2>&1 | sed 's/^/    /'
wait_healthy worker 300 2
wait_healthy gateway 120
curl -sf "http://127.0.0.1:$GW_PORT/health" >/dev/null || fail "gateway /health after the worker came back"
burst 8 2 || fail "8 concurrent requests after the killed worker came back"
say "${DC[*]} up -d --scale worker=2 brought it back (same container, same socket); both serve again"

# ---------------------------------------------------------------- down: what is left
# a witness in memd's IPC namespace keeps its /dev/shm mounted after memd's container stops, to see what is left
WITNESS=$(docker run -d --rm --ipc "container:$(cid memd)" --entrypoint sleep "$IMAGE" 600)
SHM_SEEN=$(docker exec "$WITNESS" ls /dev/shm | sort | tr '\n' ' ')
[ "$SHM_SEEN" = "$SHM_BEFORE" ] || fail "the witness does not see memd's /dev/shm: $SHM_SEEN"
T_STOP=$(date +%s)
dc stop 2>&1 | sed 's/^/    /'
say "${DC[*]} stop: $(( $(date +%s) - T_STOP )) s"
for s in gateway worker memd; do
  for c in $(cid "$s"); do
    code=$(docker inspect -f '{{.State.ExitCode}}' "$c")
    [ "$code" = 0 ] || { dc logs --tail 30 "$s"; fail "$s ($c) exited $code on SIGTERM"; }
  done
done
say "gateway, both workers, memd exited 0 on SIGTERM"
SHM_LEFT=$(docker exec "$WITNESS" ls -A /dev/shm | tr '\n' ' ')
docker kill "$WITNESS" >/dev/null
[ -z "$SHM_LEFT" ] || fail "memd's /dev/shm still holds $SHM_LEFT after it stopped"
say "memd's /dev/shm is empty after the stop (seen from a container in its IPC namespace)"
dc logs memd 2>&1 | grep -E "EAMC|pool" | tail -3 | sed 's/^/    /' || true
dc down 2>&1 | sed 's/^/    /'
LEFT=$(docker run --rm --entrypoint ls -v "${PROJECT}_state:/state" "$IMAGE" -A /state | sort | tr '\n' ' ')
say "left in the state volume: ${LEFT:-nothing}"
# memd.lock stays by design (unlinking a flock file races with a new memd opening it), and so does memd's cached
# checkpoint index (expert-index.msgpack: a restart does not index again), and the worker's compiled kernels
# (kernels-1000: built once, loaded at the next start); no socket is left
[ "$LEFT" = "eamc.bin expert-index.msgpack kernels-1000 memd.lock " ] \
  || fail "the state volume holds more than the EAMC, memd's index, the kernels and memd's lock: $LEFT"
EAMC=$(docker run --rm --entrypoint stat -v "${PROJECT}_state:/state" "$IMAGE" -c %s /state/eamc.bin)
[ "$EAMC" -gt 0 ] || fail "empty EAMC"
say "PASS: compose end to end in $(( $(date +%s) - T0 )) s (EAMC $EAMC bytes kept)"
