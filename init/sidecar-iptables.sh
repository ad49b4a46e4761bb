#!/bin/sh
# sidecar-iptables.sh: send a pod's TCP traffic to the sidecar proxy.
#
# Run once in the pod's network namespace (the init container does this, with
# NET_ADMIN) before the service and the proxy start. In the manner of Istio's
# istio-iptables it owns its own chains in the nat table and nothing else.
#
# Inbound, always: SIDECAR_INBOUND, jumped to from PREROUTING for TCP:
#
#   PREROUTING -p tcp -j SIDECAR_INBOUND
#   SIDECAR_INBOUND  -i lo                  -j RETURN   (the pod talking to itself)
#   SIDECAR_INBOUND  --dport <excluded>     -j RETURN   (proxy, TLS, admin, -d ports)
#   SIDECAR_INBOUND  --dport <captured>     -j REDIRECT --to-ports <proxy port>
#
# Outbound, with -o PORT (Istio's ISTIO_OUTPUT, ISTIO_REDIRECT, ISTIO_IN_REDIRECT):
#
#   OUTPUT -p tcp -j SIDECAR_OUTPUT
#   SIDECAR_REDIRECT     -p tcp -j REDIRECT --to-ports <outbound port>
#   SIDECAR_IN_REDIRECT  the inbound rules without -i lo: the proxy calling its
#                        own pod's address goes through the inbound proxy port
#   SIDECAR_OUTPUT  --dport <-q ports>                      -j RETURN
#                   for each proxy uid (-u), then gid (-g):
#                   -o lo ! -d 127.0.0.1/32 -p tcp owner    -j SIDECAR_IN_REDIRECT
#                   -o lo ! owner                           -j RETURN  (app to itself)
#                   owner                                   -j RETURN  (no loop)
#                   -d 127.0.0.1/32                         -j RETURN
#                   -d <-x cidrs>                           -j RETURN
#                   -d <-i cidrs> (or every address)        -j SIDECAR_REDIRECT
#
# Running it again gives the same rules; "clean" removes every chain and jump
# it made. With IPv6 in the pod the same rules go into ip6tables (::1/128 for
# loopback, the IPv6 CIDRs of -x and -i). It prints the resulting nat table and
# exits non-zero on any failure, so a pod never starts uncaptured.
#
# Tests: tests/test_iptables_script.py (and tests/golden/iptables/),
# tests/test_pod_netns.py.

set -euf

CHAIN=SIDECAR_INBOUND
OUT_CHAIN=SIDECAR_OUTPUT
REDIRECT_CHAIN=SIDECAR_REDIRECT
IN_REDIRECT_CHAIN=SIDECAR_IN_REDIRECT
ALL_CHAINS="$CHAIN $REDIRECT_CHAIN $IN_REDIRECT_CHAIN $OUT_CHAIN"
PROG=sidecar-iptables

usage() {
    cat <<USAGE
Usage: $PROG [-p PORT] [-b PORTS] [-d PORTS] [-a PORT] [-t PORT]
       [-o PORT -u UIDS|-g GIDS [-i CIDRS] [-x CIDRS] [-q PORTS]]
       [-B BACKEND] [-n] [-h] [clean]

Redirect the pod's TCP traffic to the sidecar proxy with iptables (nat table,
chains $CHAIN, and with -o $OUT_CHAIN, $REDIRECT_CHAIN and
$IN_REDIRECT_CHAIN). Every option can also be given in the environment
variable named beside it; a flag wins over its variable.

Inbound:
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

Outbound (off unless -o is given):
  -o PORT     the proxy's outbound listener: the pod's outgoing TCP is
              redirected to it, on 127.0.0.1 (::1 for IPv6)
              (SIDECAR_OUTBOUND_PORT, default none: no outbound capture)
  -u UIDS     comma-separated user ids the proxy runs as; their traffic is
              never captured, so it cannot loop (SIDECAR_PROXY_UID)
  -g GIDS     comma-separated group ids the same way (SIDECAR_PROXY_GID);
              -o needs -u or -g
  -i CIDRS    comma-separated IPv4 and IPv6 destinations to capture, or '*'
              for every address; empty captures nothing
              (SIDECAR_OUTBOUND_CIDRS, default '*')
  -x CIDRS    comma-separated destinations never to capture
              (SIDECAR_OUTBOUND_EXCLUDE_CIDRS, default none)
  -q PORTS    comma-separated destination ports never to capture
              (SIDECAR_OUTBOUND_EXCLUDE_PORTS, default none)

  -B BACKEND  iptables backend: auto, nft or legacy (SIDECAR_IPTABLES, default
              auto: the backend that already holds $CHAIN, else nft, else
              legacy); '-i auto|nft|legacy' is still read as the backend
  -n          dry run: print the commands that would change the rules, change
              nothing (SIDECAR_DRY_RUN=1)
  -h          print this help and exit
  clean       remove the chains and the jumps this script added, and nothing else

Traffic to 127.0.0.1 and ::1 is never captured, nor the pod's own processes
talking to each other over lo; the proxy's calls to its own pod's address go
through the inbound rules. IPv6 rules mirror the IPv4 ones when the pod has an
IPv6 address on an interface other than lo (SIDECAR_IPV6=auto, the default;
'on' or 'off' force it).
USAGE
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
OUTBOUND_PORT=${SIDECAR_OUTBOUND_PORT-}
PROXY_UID=${SIDECAR_PROXY_UID-}
PROXY_GID=${SIDECAR_PROXY_GID-}
OUTBOUND_CIDRS=${SIDECAR_OUTBOUND_CIDRS-*}
OUTBOUND_EXCLUDE_CIDRS=${SIDECAR_OUTBOUND_EXCLUDE_CIDRS-}
OUTBOUND_EXCLUDE_PORTS=${SIDECAR_OUTBOUND_EXCLUDE_PORTS-}
BACKEND=${SIDECAR_IPTABLES:-auto}
DRY_RUN=${SIDECAR_DRY_RUN:-0}
IPV6=${SIDECAR_IPV6:-auto}

while getopts ":p:b:d:a:t:o:u:g:i:x:q:B:nh" opt; do
    case $opt in
        p) PROXY_PORT=$OPTARG ;;
        b) INBOUND_PORTS=$OPTARG ;;
        d) EXCLUDE_PORTS=$OPTARG ;;
        a) ADMIN_PORT=$OPTARG ;;
        t) TLS_PORT=$OPTARG ;;
        o) OUTBOUND_PORT=$OPTARG ;;
        u) PROXY_UID=$OPTARG ;;
        g) PROXY_GID=$OPTARG ;;
        i)
            # -i was the backend before outbound capture took it, as Istio's
            # included CIDRs; those three words are never CIDRs.
            case $OPTARG in
                auto | nft | legacy) BACKEND=$OPTARG ;;
                *) OUTBOUND_CIDRS=$OPTARG ;;
            esac
            ;;
        x) OUTBOUND_EXCLUDE_CIDRS=$OPTARG ;;
        q) OUTBOUND_EXCLUDE_PORTS=$OPTARG ;;
        B) BACKEND=$OPTARG ;;
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

# is_number VALUE MAX: true when VALUE is a decimal number from 0 to MAX,
# written without leading zeros.
is_number() {
    case $1 in
        '' | *[!0-9]* | 0?*) return 1 ;;
    esac
    [ ${#1} -le ${#2} ] && [ "$1" -le "$2" ]
}

# is_port VALUE: true when VALUE is a decimal TCP port number, 1 to 65535.
is_port() {
    [ "$1" != 0 ] && is_number "$1" 65535
}

# check_port WHAT VALUE: exit with a usage error unless VALUE is a port.
check_port() {
    is_port "$2" || usage_error "$1 must be a port number from 1 to 65535, not '$2'."
}

# check_ports WHAT LIST: exit with a usage error unless LIST is comma-separated ports.
check_ports() {
    for port in $(split "$2"); do
        is_port "$port" ||
            usage_error "$1 must be comma-separated port numbers from 1 to 65535; '$port' is not one."
    done
    case ,$2, in
        *,,*) [ "$2" = "" ] || usage_error "$1 must be comma-separated port numbers from 1 to 65535; '$2' has an empty one." ;;
    esac
}

# check_ids WHAT LIST: exit with a usage error unless LIST is comma-separated
# numeric user or group ids (names would be looked up in this image, not the proxy's).
check_ids() {
    case ,$2, in
        ,,) return 0 ;;
        *,,*) usage_error "$1 must be comma-separated numeric ids; '$2' has an empty one." ;;
    esac
    for id in $(split "$2"); do
        is_number "$id" 4294967294 ||
            usage_error "$1 must be comma-separated numeric ids from 0 to 4294967294; '$id' is not one."
    done
}

# split LIST: the items of a comma-separated list, one per word.
split() {
    echo "$1" | tr , ' '
}

# is_ipv4 ADDRESS: true for a dotted quad such as 10.0.0.1.
is_ipv4() {
    case $1 in
        *[!0-9.]* | .* | *. | *..*) return 1 ;;
    esac
    old_ifs=$IFS
    IFS=.
    # shellcheck disable=SC2086 # split on the dots; only digits remain
    set -- $1
    IFS=$old_ifs
    [ $# -eq 4 ] || return 1
    for octet; do
        is_number "$octet" 255 || return 1
    done
}

# is_ipv6 ADDRESS: true for an IPv6 address in hexadecimal groups, such as
# 2001:db8::1 (the dotted-quad forms are not accepted).
is_ipv6() {
    case $1 in
        '' | *[!0-9a-fA-F:]* | *:::* | :[!:]* | *[!:]:) return 1 ;;
    esac
    compressed=0
    case $1 in
        *::*::*) return 1 ;;
        *::*) compressed=1 ;;
    esac
    old_ifs=$IFS
    IFS=:
    # shellcheck disable=SC2086 # split on the colons; only hex digits remain
    set -- $1
    IFS=$old_ifs
    groups=0
    for group; do
        [ -n "$group" ] || continue
        [ ${#group} -le 4 ] || return 1
        groups=$((groups + 1))
    done
    if [ "$compressed" = 1 ]; then
        [ "$groups" -le 7 ]
    else
        [ "$groups" -eq 8 ]
    fi
}

# cidr WHAT VALUE: set FAMILY to 4 or 6 and NET to VALUE as address/prefix (a
# bare address gets /32 or /128), or exit with a usage error naming it.
cidr() {
    address=${2%/*}
    prefix=${2#"$address"}
    prefix=${prefix#/}
    if is_ipv4 "$address"; then
        FAMILY=4
        max=32
    elif is_ipv6 "$address"; then
        FAMILY=6
        max=128
    else
        usage_error "$1 must be comma-separated IPv4 or IPv6 addresses or CIDRs; '$2' is not one."
    fi
    if [ "$address" = "$2" ]; then
        prefix=$max
    fi
    is_number "$prefix" "$max" ||
        usage_error "$1 must be comma-separated IPv4 or IPv6 addresses or CIDRs; '$2' needs a prefix length from 0 to $max."
    NET=$address/$prefix
}

# check_cidrs WHAT LIST: validate a comma-separated CIDR list and set CIDRS4 and
# CIDRS6 to its IPv4 and its IPv6 members, space-separated.
check_cidrs() {
    case ,$2, in
        *,,*) [ "$2" = "" ] || usage_error "$1 must be comma-separated IPv4 or IPv6 addresses or CIDRs; '$2' has an empty one." ;;
    esac
    CIDRS4=''
    CIDRS6=''
    for item in $(split "$2"); do
        cidr "$1" "$item"
        if [ "$FAMILY" = 4 ]; then CIDRS4="$CIDRS4 $NET"; else CIDRS6="$CIDRS6 $NET"; fi
    done
}

check_port "the proxy port (-p)" "$PROXY_PORT"
[ -z "$ADMIN_PORT" ] || check_port "the admin port (-a)" "$ADMIN_PORT"
[ -z "$TLS_PORT" ] || check_port "the TLS port (-t)" "$TLS_PORT"
[ "$INBOUND_PORTS" = '*' ] || check_ports "the inbound ports (-b)" "$INBOUND_PORTS"
check_ports "the excluded ports (-d)" "$EXCLUDE_PORTS"
case $BACKEND in
    auto | nft | legacy) ;;
    *) usage_error "the backend (-B) must be auto, nft or legacy, not '$BACKEND'." ;;
esac
case $IPV6 in
    auto | on | off) ;;
    *) usage_error "SIDECAR_IPV6 must be auto, on or off, not '$IPV6'." ;;
esac
case $DRY_RUN in
    0 | 1) ;;
    *) usage_error "SIDECAR_DRY_RUN must be 0 or 1, not '$DRY_RUN'." ;;
esac

OUTBOUND=0
INCLUDE4='' INCLUDE6='' EXCLUDE4='' EXCLUDE6=''
if [ -n "$OUTBOUND_PORT" ]; then
    OUTBOUND=1
    check_port "the outbound port (-o)" "$OUTBOUND_PORT"
    check_ids "the proxy's user ids (-u)" "$PROXY_UID"
    check_ids "the proxy's group ids (-g)" "$PROXY_GID"
    if [ -z "$PROXY_UID$PROXY_GID" ]; then
        usage_error "outbound capture (-o) needs the proxy's user id (-u) or group id (-g), or the proxy's own connections would loop back to it."
    fi
    if [ "$OUTBOUND_CIDRS" = '*' ]; then
        INCLUDE4='*' INCLUDE6='*'
    else
        check_cidrs "the outbound CIDRs (-i)" "$OUTBOUND_CIDRS"
        INCLUDE4=$CIDRS4 INCLUDE6=$CIDRS6
    fi
    [ "$OUTBOUND_EXCLUDE_CIDRS" != '*' ] ||
        usage_error "the excluded outbound CIDRs (-x) cannot be '*'; to capture nothing outbound, give -i ''."
    check_cidrs "the excluded outbound CIDRs (-x)" "$OUTBOUND_EXCLUDE_CIDRS"
    EXCLUDE4=$CIDRS4 EXCLUDE6=$CIDRS6
    check_ports "the excluded outbound ports (-q)" "$OUTBOUND_EXCLUDE_PORTS"
else
    for setting in "-u:$PROXY_UID" "-g:$PROXY_GID" "-x:$OUTBOUND_EXCLUDE_CIDRS" \
        "-q:$OUTBOUND_EXCLUDE_PORTS"; do
        [ -z "${setting#-?:}" ] ||
            usage_error "${setting%%:*} is an outbound option, and outbound capture is off; give the outbound port with -o too."
    done
    [ "$OUTBOUND_CIDRS" = '*' ] ||
        usage_error "-i is an outbound option, and outbound capture is off; give the outbound port with -o too."
fi

# The ports that are never captured, without repeats: the proxy's own first.
EXCLUDED=
for port in $PROXY_PORT $TLS_PORT $ADMIN_PORT $(split "$EXCLUDE_PORTS"); do
    case " $EXCLUDED " in
        *" $port "*) ;;
        *) EXCLUDED="$EXCLUDED $port" ;;
    esac
done

# The chains this run wants: the others of ours are removed.
WANTED=$CHAIN
if [ "$OUTBOUND" = 1 ]; then
    WANTED="$WANTED $REDIRECT_CHAIN"
    [ -z "$INBOUND_PORTS" ] || WANTED="$WANTED $IN_REDIRECT_CHAIN"
    WANTED="$WANTED $OUT_CHAIN"
fi

# run COMMAND...: change the rules, or only print the command in a dry run.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        echo "$*"
    elif ! "$@"; then
        die "this command failed, so the pod's traffic may not be captured: $*"
    fi
}

# has_chain IPTABLES [CHAIN]: true when the nat table holds that chain of ours
# (read-only; the inbound chain by default).
has_chain() {
    "$1" -w 5 -t nat -S "${2:-$CHAIN}" >/dev/null 2>&1
}

# jump_count IPTABLES HOOK CHAIN: how many HOOK rules jump to CHAIN (read-only).
jump_count() {
    { "$1" -w 5 -t nat -S "$2" 2>/dev/null || true; } |
        grep -c -x -- "-A $2 -p tcp -j $3" || true
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

# set_jumps IPTABLES HOOK CHAIN COUNT: make HOOK jump to CHAIN (for TCP) COUNT
# times, 0 or 1, adding or deleting jumps as needed.
set_jumps() {
    jumps=$(jump_count "$1" "$2" "$3")
    if [ "$jumps" -lt "$4" ]; then
        run "$1" -w 5 -t nat -A "$2" -p tcp -j "$3"
    fi
    while [ "$jumps" -gt "$4" ]; do
        run "$1" -w 5 -t nat -D "$2" -p tcp -j "$3"
        jumps=$((jumps - 1))
    done
}

# remove_chains IPTABLES CHAIN...: flush, then delete, those of the chains that
# exist (flushing all first drops the jumps between them).
remove_chains() {
    chains_ipt=$1
    shift
    for chain; do
        if has_chain "$chains_ipt" "$chain"; then run "$chains_ipt" -w 5 -t nat -F "$chain"; fi
    done
    for chain; do
        if has_chain "$chains_ipt" "$chain"; then run "$chains_ipt" -w 5 -t nat -X "$chain"; fi
    done
}

# release IPTABLES: delete every jump to our chains, then the chains.
release() {
    set_jumps "$1" PREROUTING "$CHAIN" 0
    set_jumps "$1" OUTPUT "$OUT_CHAIN" 0
    # shellcheck disable=SC2086 # a list of chain names
    remove_chains "$1" $ALL_CHAINS
}

# inbound_rules IPTABLES CHAIN: append the inbound exclusions and redirects to CHAIN.
inbound_rules() {
    for port in $EXCLUDED; do
        run "$1" -w 5 -t nat -A "$2" -p tcp --dport "$port" -j RETURN
    done
    if [ "$INBOUND_PORTS" = '*' ]; then
        run "$1" -w 5 -t nat -A "$2" -p tcp -j REDIRECT --to-ports "$PROXY_PORT"
    else
        for port in $(split "$INBOUND_PORTS"); do
            run "$1" -w 5 -t nat -A "$2" -p tcp --dport "$port" -j REDIRECT --to-ports "$PROXY_PORT"
        done
    fi
}

# out_rule IPTABLES RULE...: append a rule to the outbound chain.
out_rule() {
    rule_ipt=$1
    shift
    run "$rule_ipt" -w 5 -t nat -A "$OUT_CHAIN" "$@"
}

# owner_rules IPTABLES LOOPBACK MATCH ID: Istio's three rules for one proxy user
# (MATCH --uid-owner) or group (--gid-owner).
owner_rules() {
    # The proxy calling its own pod's address (a service that resolved to this
    # pod) goes through the inbound rules, as a call from another pod would.
    case " $WANTED " in
        *" $IN_REDIRECT_CHAIN "*)
            out_rule "$1" -o lo ! -d "$2" -p tcp -m owner "$3" "$4" -j "$IN_REDIRECT_CHAIN" ;;
    esac
    # The application calling itself, by its pod address or by loopback, stays
    # direct, unless loopback addresses were asked for with -i.
    [ "$INCLUDES_LOOPBACK" = 1 ] || out_rule "$1" -o lo -m owner ! "$3" "$4" -j RETURN
    # The proxy's own connections are never captured: that would be a loop.
    out_rule "$1" -m owner "$3" "$4" -j RETURN
}

# outbound_rules IPTABLES FAMILY: fill the outbound chains for family 4 or 6.
outbound_rules() {
    if [ "$2" = 6 ]; then
        loopback=::1/128 include=$INCLUDE6 exclude=$EXCLUDE6
    else
        loopback=127.0.0.1/32 include=$INCLUDE4 exclude=$EXCLUDE4
    fi
    INCLUDES_LOOPBACK=0
    for net in $include; do
        case $net in
            127.* | ::1/*) INCLUDES_LOOPBACK=1 ;;
        esac
    done
    run "$1" -w 5 -t nat -A "$REDIRECT_CHAIN" -p tcp -j REDIRECT --to-ports "$OUTBOUND_PORT"
    case " $WANTED " in
        *" $IN_REDIRECT_CHAIN "*) inbound_rules "$1" "$IN_REDIRECT_CHAIN" ;;
    esac
    # Port exclusions come before everything, as in Istio.
    for port in $(split "$OUTBOUND_EXCLUDE_PORTS"); do
        out_rule "$1" -p tcp --dport "$port" -j RETURN
    done
    for id in $(split "$PROXY_UID"); do
        owner_rules "$1" "$loopback" --uid-owner "$id"
    done
    for id in $(split "$PROXY_GID"); do
        owner_rules "$1" "$loopback" --gid-owner "$id"
    done
    out_rule "$1" -d "$loopback" -j RETURN
    for net in $exclude; do
        out_rule "$1" -d "$net" -j RETURN
    done
    if [ "$include" = '*' ]; then
        out_rule "$1" -j "$REDIRECT_CHAIN"
    else
        for net in $include; do
            out_rule "$1" -d "$net" -j "$REDIRECT_CHAIN"
        done
    fi
}

# capture IPTABLES FAMILY: make our chains hold exactly the rules asked for, each
# jumped to once, and remove those of ours not asked for.
capture() {
    for chain in $WANTED; do
        if has_chain "$1" "$chain"; then
            run "$1" -w 5 -t nat -F "$chain"
        else
            run "$1" -w 5 -t nat -N "$chain"
        fi
    done
    # Traffic the pod sends to itself never reaches the nat PREROUTING hook for a new
    # connection (it is translated in OUTPUT), but say so in the rules too.
    run "$1" -w 5 -t nat -A "$CHAIN" -i lo -j RETURN
    inbound_rules "$1" "$CHAIN"
    [ "$OUTBOUND" = 0 ] || outbound_rules "$1" "$2"
    set_jumps "$1" PREROUTING "$CHAIN" 1
    set_jumps "$1" OUTPUT "$OUT_CHAIN" "$OUTBOUND"
    unwanted=
    for chain in $ALL_CHAINS; do
        case " $WANTED " in
            *" $chain "*) ;;
            *) unwanted="$unwanted $chain" ;;
        esac
    done
    # shellcheck disable=SC2086 # a list of chain names
    remove_chains "$1" $unwanted
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
    family=4
    [ "$ipt" = "$IPT4" ] || family=6
    if [ "$ACTION" = clean ]; then
        release "$ipt"
    else
        capture "$ipt" "$family"
    fi
done

if [ "$DRY_RUN" = 1 ]; then
    echo "# dry run: nothing was changed" >&2
else
    for ipt in $FAMILIES; do
        show "$ipt"
    done
fi
