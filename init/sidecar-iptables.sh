#!/bin/sh
# sidecar-iptables.sh: send a pod's inbound TCP traffic to the sidecar proxy.
#
# Run once in the pod's network namespace (the init container does this, with
# NET_ADMIN) before the service and the proxy start. In the manner of Istio's
# istio-iptables, it owns one chain, SIDECAR_INBOUND in the nat table, jumped to
# from PREROUTING for TCP:
#
#   PREROUTING -p tcp -j SIDECAR_INBOUND
#   SIDECAR_INBOUND  -i lo                  -j RETURN   (the pod talking to itself)
#   SIDECAR_INBOUND  --dport <excluded>     -j RETURN   (proxy, TLS, admin, -d ports)
#   SIDECAR_INBOUND  --dport <captured>     -j REDIRECT --to-ports <proxy port>
#
# Running it again gives the same rules; "clean" removes the chain and the jump.
# With IPv6 in the pod the same rules go into ip6tables. It prints the resulting
# nat table and exits non-zero on any failure, so a pod never starts uncaptured.
#
# Tests: tests/test_iptables_script.py and tests/test_pod_netns.py.

set -eu

CHAIN=SIDECAR_INBOUND
PROG=sidecar-iptables

usage() {
    cat <<EOF
Usage: $PROG [-p PORT] [-b PORTS] [-d PORTS] [-a PORT] [-t PORT] [-i BACKEND] [-n] [-h] [clean]

Redirect the pod's inbound TCP traffic to the sidecar proxy with iptables (nat
table, chain $CHAIN). Every option can also be given in the environment
variable named beside it; a flag wins over its variable.

  -p PORT     the proxy's listening port that traffic is redirected to
              (SIDECAR_PROXY_PORT, default 8000)
  -b PORTS    comma-separated inbound ports to capture, or '*' for every port;
              empty captures nothing (SIDECAR_INBOUND_PORTS, default 80)
  -d PORTS    comma-separated inbound ports never to capture
              (SIDECAR_EXCLUDE_PORTS, default none)
  -a PORT     the proxy's admin port, never captured; empty for none
              (SIDECAR_ADMIN_PORT, default 15000)
  -t PORT     the proxy's TLS listening port, never captured; empty for none
              (SIDECAR_TLS_PORT, default 8443)
  -i BACKEND  iptables backend: auto, nft or legacy (SIDECAR_IPTABLES, default
              auto: the backend that already holds $CHAIN, else nft, else legacy)
  -n          dry run: print the commands that would change the rules, change
              nothing (SIDECAR_DRY_RUN=1)
  -h          print this help and exit
  clean       remove the chain and the jump this script added, and nothing else

IPv6 rules mirror the IPv4 ones when the pod has an IPv6 address on an
interface other than lo (SIDECAR_IPV6=auto, the default; 'on' or 'off' force it).
EOF
}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

usage_error() {
    echo "$PROG: $*" >&2
    echo "Run '$PROG -h' for help." >&2
    exit 2
}

PROXY_PORT=${SIDECAR_PROXY_PORT:-8000}
INBOUND_PORTS=${SIDECAR_INBOUND_PORTS-80}
EXCLUDE_PORTS=${SIDECAR_EXCLUDE_PORTS-}
ADMIN_PORT=${SIDECAR_ADMIN_PORT-15000}
TLS_PORT=${SIDECAR_TLS_PORT-8443}
BACKEND=${SIDECAR_IPTABLES:-auto}
DRY_RUN=${SIDECAR_DRY_RUN:-0}
IPV6=${SIDECAR_IPV6:-auto}

while getopts ":p:b:d:a:t:i:nh" opt; do
    case $opt in
        p) PROXY_PORT=$OPTARG ;;
        b) INBOUND_PORTS=$OPTARG ;;
        d) EXCLUDE_PORTS=$OPTARG ;;
        a) ADMIN_PORT=$OPTARG ;;
        t) TLS_PORT=$OPTARG ;;
        i) BACKEND=$OPTARG ;;
        n) DRY_RUN=1 ;;
        h) usage; exit 0 ;;
        :) usage_error "option -$OPTARG needs a value." ;;
        *) usage_error "unknown option -$OPTARG." ;;
    esac
done
shift $((OPTIND - 1))

ACTION=setup
if [ $# -gt 0 ]; then
    case $1 in
        clean) ACTION=clean ;;
        *) usage_error "unknown argument '$1' (the only command is 'clean')." ;;
    esac
    shift
    [ $# -eq 0 ] || usage_error "unexpected arguments after 'clean': $*."
fi

# is_port VALUE: true when VALUE is a decimal TCP port number, 1 to 65535.
is_port() {
    case $1 in
        '' | *[!0-9]* | 0*) return 1 ;;
    esac
    [ ${#1} -le 5 ] && [ "$1" -le 65535 ]
}

# check_port WHAT VALUE: exit with a usage error unless VALUE is a port.
check_port() {
    is_port "$2" || usage_error "$1 must be a port number from 1 to 65535, not '$2'."
}

# check_ports WHAT LIST: exit with a usage error unless LIST is comma-separated ports.
check_ports() {
    old_ifs=$IFS
    IFS=,
    for port in $2; do
        is_port "$port" || {
            IFS=$old_ifs
            usage_error "$1 must be comma-separated port numbers from 1 to 65535; '$port' is not one."
        }
    done
    IFS=$old_ifs
}

check_port "the proxy port (-p)" "$PROXY_PORT"
[ -z "$ADMIN_PORT" ] || check_port "the admin port (-a)" "$ADMIN_PORT"
[ -z "$TLS_PORT" ] || check_port "the TLS port (-t)" "$TLS_PORT"
[ "$INBOUND_PORTS" = '*' ] || check_ports "the inbound ports (-b)" "$INBOUND_PORTS"
check_ports "the excluded ports (-d)" "$EXCLUDE_PORTS"
case $BACKEND in
    auto | nft | legacy) ;;
    *) usage_error "the backend (-i) must be auto, nft or legacy, not '$BACKEND'." ;;
esac
case $IPV6 in
    auto | on | off) ;;
    *) usage_error "SIDECAR_IPV6 must be auto, on or off, not '$IPV6'." ;;
esac
case $DRY_RUN in
    0 | 1) ;;
    *) usage_error "SIDECAR_DRY_RUN must be 0 or 1, not '$DRY_RUN'." ;;
esac

# The ports that are never captured, without repeats: the proxy's own first.
EXCLUDED=
for port in $PROXY_PORT $TLS_PORT $ADMIN_PORT $(echo "$EXCLUDE_PORTS" | tr , ' '); do
    case " $EXCLUDED " in
        *" $port "*) ;;
        *) EXCLUDED="$EXCLUDED $port" ;;
    esac
done

# run COMMAND...: change the rules, or only print the command in a dry run.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        echo "$*"
    elif ! "$@"; then
        die "this command failed, so the pod's traffic may not be captured: $*"
    fi
}

# has_chain IPTABLES: true when the nat table holds our chain (read-only).
has_chain() {
    "$1" -w 5 -t nat -S "$CHAIN" >/dev/null 2>&1
}

# jump_count IPTABLES: how many PREROUTING rules jump to our chain (read-only).
jump_count() {
    { "$1" -w 5 -t nat -S PREROUTING 2>/dev/null || true; } |
        grep -c -x -- "-A PREROUTING -p tcp -j $CHAIN" || true
}

# usable IPTABLES: true when that command exists and can read the nat table.
usable() {
    command -v "$1" >/dev/null 2>&1 && "$1" -w 5 -t nat -S PREROUTING >/dev/null 2>&1
}

# legacy_nat_exists: true when this namespace has a legacy nat table. Asking
# iptables-legacy itself would create an empty one, which would then be left behind.
legacy_nat_exists() {
    [ -r /proc/net/ip_tables_names ] && grep -qx nat /proc/net/ip_tables_names
}

# Pick the iptables backend: the variant suffix of the command names.
choose_backend() {
    case $BACKEND in
        nft) SUFFIX=-nft ;;
        legacy) SUFFIX=-legacy ;;
        auto)
            if legacy_nat_exists && command -v iptables-legacy >/dev/null 2>&1 &&
                has_chain iptables-legacy; then
                SUFFIX=-legacy
            elif usable iptables-nft; then
                SUFFIX=-nft
            elif usable iptables-legacy; then
                SUFFIX=-legacy
            else
                # Neither variant answers (no root, or an old iptables): use the plain
                # command, which a dry run only prints and a real run reports failing.
                SUFFIX=
            fi
            ;;
    esac
    IPT4=iptables$SUFFIX
    IPT6=ip6tables$SUFFIX
    if [ "$DRY_RUN" = 0 ]; then
        command -v "$IPT4" >/dev/null 2>&1 || die "cannot find $IPT4; install iptables."
    fi
}

# pod_has_ipv6: true when an interface other than lo has an IPv6 address.
pod_has_ipv6() {
    [ -r /proc/net/if_inet6 ] || return 1
    while read -r _ _ _ _ _ ifname; do
        [ "$ifname" = lo ] || return 0
    done </proc/net/if_inet6
    return 1
}

# release IPTABLES: delete every jump to our chain, then the chain.
release() {
    jumps=$(jump_count "$1")
    while [ "$jumps" -gt 0 ]; do
        run "$1" -w 5 -t nat -D PREROUTING -p tcp -j "$CHAIN"
        jumps=$((jumps - 1))
    done
    if has_chain "$1"; then
        run "$1" -w 5 -t nat -F "$CHAIN"
        run "$1" -w 5 -t nat -X "$CHAIN"
    fi
}

# capture IPTABLES: make our chain hold exactly the rules asked for, jumped to once.
capture() {
    if has_chain "$1"; then
        run "$1" -w 5 -t nat -F "$CHAIN"
    else
        run "$1" -w 5 -t nat -N "$CHAIN"
    fi
    # Traffic the pod sends to itself never reaches the nat PREROUTING hook for a new
    # connection (it is translated in OUTPUT), but say so in the rules too.
    run "$1" -w 5 -t nat -A "$CHAIN" -i lo -j RETURN
    for port in $EXCLUDED; do
        run "$1" -w 5 -t nat -A "$CHAIN" -p tcp --dport "$port" -j RETURN
    done
    if [ "$INBOUND_PORTS" = '*' ]; then
        run "$1" -w 5 -t nat -A "$CHAIN" -p tcp -j REDIRECT --to-ports "$PROXY_PORT"
    else
        for port in $(echo "$INBOUND_PORTS" | tr , ' '); do
            run "$1" -w 5 -t nat -A "$CHAIN" -p tcp --dport "$port" -j REDIRECT --to-ports "$PROXY_PORT"
        done
    fi
    jumps=$(jump_count "$1")
    if [ "$jumps" -eq 0 ]; then
        run "$1" -w 5 -t nat -A PREROUTING -p tcp -j "$CHAIN"
    fi
    while [ "$jumps" -gt 1 ]; do
        run "$1" -w 5 -t nat -D PREROUTING -p tcp -j "$CHAIN"
        jumps=$((jumps - 1))
    done
}

# show IPTABLES: print the nat table as it now is.
show() {
    if [ "$DRY_RUN" = 0 ]; then
        "$1-save" -t nat || die "cannot list the rules with $1-save."
    fi
}

choose_backend
FAMILIES=$IPT4
case $IPV6 in
    on) FAMILIES="$IPT4 $IPT6" ;;
    auto) if pod_has_ipv6; then FAMILIES="$IPT4 $IPT6"; fi ;;
esac
if [ "$ACTION" = clean ] && [ "$IPV6" = auto ] && [ "$FAMILIES" = "$IPT4" ]; then
    # The pod may have lost its IPv6 address since setup: clean what is there.
    if command -v "$IPT6" >/dev/null 2>&1 && has_chain "$IPT6"; then
        FAMILIES="$IPT4 $IPT6"
    fi
fi
if [ "$DRY_RUN" = 0 ]; then
    for ipt in $FAMILIES; do
        command -v "$ipt" >/dev/null 2>&1 || die "cannot find $ipt; install iptables."
    done
fi

for ipt in $FAMILIES; do
    if [ "$ACTION" = clean ]; then
        release "$ipt"
    else
        capture "$ipt"
    fi
done

if [ "$DRY_RUN" = 1 ]; then
    echo "# dry run: nothing was changed" >&2
else
    for ipt in $FAMILIES; do
        show "$ipt"
    done
fi
