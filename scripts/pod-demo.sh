#!/usr/bin/env bash
# The article's demo without a cluster: transparent interception in a network namespace.
#
# Builds a "pod" out of a Linux network namespace joined to this host by a veth pair
# on a private /30 that exists only while the demo runs, then, inside it, does what
# the article's Pod does: httpbin on port 80, the sidecar on 8000 in front of it, and
# init/sidecar-iptables.sh redirecting inbound port 80 to 8000. It sends the article's
# three requests from this host to the pod's port 80 and prints the answers and the
# proxy's statistics, shows that the pod reaches itself directly over loopback, that
# running the init script again changes nothing, and that `clean` undoes it all.
#
# Needs root, ip (iproute2), iptables, curl, and a Python with this project, httpbin
# and gunicorn (`make pod-demo` uses the project's venv). Everything it starts or
# creates is removed on exit, however it exits.
#
# Tested the same way by tests/test_pod_netns.py.

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCRIPT="$ROOT/init/sidecar-iptables.sh"
PYTHON=${PYTHON:-python3}
SERVICE_PORT=80
PROXY_PORT=8000
NS="sidecar-demo-$$"
HOST_END="scd$$"
WORK=$(mktemp -d)
PIDS=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "pod-demo: $*" >&2; exit 1; }

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    # Deleting the namespace deletes the veth pair and every rule inside it.
    ip netns delete "$NS" 2>/dev/null || true
    ip link delete "$HOST_END" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" -eq 0 ] || die "needs root, to create a network namespace and change its iptables rules."
for program in ip iptables iptables-save curl "$PYTHON"; do
    command -v "$program" >/dev/null || die "needs $program, which is not on PATH."
done
"$PYTHON" -c "import httpbin, gunicorn" 2>/dev/null ||
    die "needs the httpbin and gunicorn Python packages for $PYTHON (pip install -r requirements-test.txt)."

# in_pod COMMAND...: run a command inside the pod's namespace.
in_pod() { ip netns exec "$NS" "$@"; }

# wait_for DESCRIPTION COMMAND...: poll a readiness check, for at most 30 seconds.
wait_for() {
    local what=$1 tries=300
    shift
    until "$@" >/dev/null 2>&1; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || die "gave up waiting for $what; see the logs in $WORK."
        sleep 0.1
    done
}

# A /30 in 10.250.0.0/16 that no address or route on this host overlaps.
pick_network() {
    local n
    for n in $(seq $(($$ % 250)) 249) $(seq 0 $(($$ % 250))); do
        if ! ip -4 -o addr show | grep -q " 10\.250\.$n\." &&
            ! ip -4 route show | grep -q "^10\.250\.$n\." &&
            ! ip -4 route show | grep -q "^10\.250\.0\.0/16"; then
            echo "$n"
            return
        fi
    done
    die "found no free /30 in 10.250.0.0/16."
}

say "A pod: network namespace $NS, joined to this host by a veth pair"
subnet=$(pick_network)
HOST_IP="10.250.$subnet.1"
POD_IP="10.250.$subnet.2"
ip netns add "$NS"
ip link add "$HOST_END" type veth peer name eth0 netns "$NS"
ip addr add "$HOST_IP/30" dev "$HOST_END"
ip link set "$HOST_END" up
in_pod ip link set lo up
in_pod ip addr add "$POD_IP/30" dev eth0
in_pod ip link set eth0 up
echo "this host: $HOST_IP    the pod: $POD_IP (eth0)"

say "The init container: sidecar-iptables.sh -p $PROXY_PORT -b $SERVICE_PORT"
in_pod sh "$SCRIPT" -p "$PROXY_PORT" -b "$SERVICE_PORT" | tee "$WORK/rules-1"

say "The service (httpbin on 0.0.0.0:$SERVICE_PORT) and the sidecar (on $PROXY_PORT, upstream $SERVICE_PORT)"
# `ip netns exec` execs the program, so $! is the program's own process id.
ip netns exec "$NS" "$PYTHON" -m gunicorn --workers 1 --bind "0.0.0.0:$SERVICE_PORT" httpbin:app \
    >"$WORK/httpbin.log" 2>&1 &
PIDS+=($!)
proxy_flags=(--listen "$PROXY_PORT" --upstream "$SERVICE_PORT" --admin 15000
    --log-format seed --access-log -)
# A proxy that drains on SIGTERM would keep the demo's exit waiting for the drain.
if (cd "$ROOT" && PYTHONPATH="$ROOT" "$PYTHON" -m twisted sidecar --help) | grep -q -- --drain-timeout; then
    proxy_flags+=(--drain-timeout 0)
fi
(cd "$ROOT" && PYTHONPATH="$ROOT" PYTHONUNBUFFERED=1 exec ip netns exec "$NS" \
    "$PYTHON" -m twisted sidecar "${proxy_flags[@]}") >"$WORK/proxy.log" 2>&1 &
PIDS+=($!)
wait_for "httpbin" in_pod curl -sf --noproxy '*' "http://127.0.0.1:$SERVICE_PORT/status/200"
# The kubelet's view: the health port (15021, every interface); the admin site is loopback only.
wait_for "the sidecar" curl -sf --noproxy "*" "http://$POD_IP:15021/healthz/ready"
echo "both are up"

say "The article's three requests, from this host to the service port $POD_IP:$SERVICE_PORT"
for request in "/get?query=param" "-X POST -d body=parameters /post" "/status/429"; do
    read -r -a words <<<"$request"
    path=${words[${#words[@]}-1]}
    unset 'words[${#words[@]}-1]'
    echo "\$ curl -i ${words[*]:+${words[*]} }http://$POD_IP:$SERVICE_PORT$path"
    curl -sS -i --noproxy '*' --max-time 10 "${words[@]}" "http://$POD_IP:$SERVICE_PORT$path" |
        tr -d '\r' | sed -n '/^$/q;p' | grep -iE '^(HTTP/|content-length|content-type|server)'
    echo
done

say "The proxy's statistics (kubectl logs httpbin-pod -c proxy, in the article)"
wait_for "three records in the proxy's log" test "$(grep -c '^Response Status:' "$WORK/proxy.log")" -ge 3
grep -E '^(Original URL|Proxy URL|Request Duration|Request Size|Response Size|Response Status):|^$' \
    "$WORK/proxy.log" | cat -s

say "Inside the pod, 127.0.0.1:$SERVICE_PORT and $POD_IP:$SERVICE_PORT reach httpbin directly over loopback"
for host in 127.0.0.1 "$POD_IP"; do
    printf '%-28s ' "http://$host:$SERVICE_PORT/get"
    in_pod curl -sS -i --noproxy '*' --max-time 10 "http://$host:$SERVICE_PORT/get" |
        tr -d '\r' | grep -i '^server:' || echo "(no Server header)"
done

say "Running the init script again changes nothing"
in_pod sh "$SCRIPT" -p "$PROXY_PORT" -b "$SERVICE_PORT" >"$WORK/rules-2"
normalize() { grep -v '^#' "$1" | sed -E 's/ \[[0-9]+:[0-9]+\]$//'; }
if diff <(normalize "$WORK/rules-1") <(normalize "$WORK/rules-2"); then
    echo "same rules as after the first run (counters aside)"
else
    die "the second run changed the rules."
fi

say "sidecar-iptables.sh clean: the rules go, and port $SERVICE_PORT reaches httpbin directly"
in_pod sh "$SCRIPT" -p "$PROXY_PORT" -b "$SERVICE_PORT" clean
echo "\$ curl -i http://$POD_IP:$SERVICE_PORT/get"
curl -sS -i --noproxy '*' --max-time 10 "http://$POD_IP:$SERVICE_PORT/get" |
    tr -d '\r' | sed -n '/^$/q;p' | grep -iE '^(HTTP/|server)'

say "Done; removing the namespace, the veth pair and the processes"
