# -*- test-case-name: tests.test_iptables_script -*-
"""
Tests for C{init/sidecar-iptables.sh}, the init container's script.

Most tests run the script against stand-in C{iptables} commands that record
every call and answer queries from their environment, so they need neither
root nor a kernel: they check which commands the script runs, in which order,
for every option. The rest run it against the real C{iptables-nft} and
C{iptables-legacy} inside a network namespace made for the test (root only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Iterable

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from tests.test_pod_netns import (
    SCRIPT,
    NetworkNamespace,
    missingForNamespaces,
    normalizedRules,
    ourTrace,
    pollUntil,
    stopProcess,
)

CHAIN = "SIDECAR_INBOUND"

# A stand-in for every iptables command the script may call. It appends its
# name and arguments to $STUB_LOG and answers from the environment:
#   STUB_HAS_CHAIN   names of the commands whose nat table holds our chains
#   STUB_CHAINS      which of our chains those are (default SIDECAR_INBOUND)
#   STUB_JUMPS       how many PREROUTING jumps to SIDECAR_INBOUND there are
#   STUB_OUT_JUMPS   how many OUTPUT jumps to SIDECAR_OUTPUT there are
#   STUB_UNUSABLE    names of the commands that fail as without root
#   STUB_FAIL        a piece of a command line that makes the command fail
STUB = """#!/bin/sh
name=${0##*/}
echo "$name $*" >>"$STUB_LOG"
case $name in
    *-save) echo "# rules as $name prints them"; exit 0 ;;
esac
case " ${STUB_UNUSABLE:-} " in
    *" $name "*) echo "$name: Permission denied (you must be root)" >&2; exit 4 ;;
esac
case "$*" in
    *"-S SIDECAR_"*)
        chain=${*##* }
        case " ${STUB_HAS_CHAIN:-} " in
            *" $name "*)
                case " ${STUB_CHAINS:-SIDECAR_INBOUND} " in
                    *" $chain "*) echo "-N $chain"; exit 0 ;;
                esac ;;
        esac
        echo "iptables: No chain/target/match by that name." >&2
        exit 1 ;;
    *"-S PREROUTING")
        echo "-P PREROUTING ACCEPT"
        i=0
        while [ "$i" -lt "${STUB_JUMPS:-0}" ]; do
            echo "-A PREROUTING -p tcp -j SIDECAR_INBOUND"
            i=$((i + 1))
        done
        exit 0 ;;
    *"-S OUTPUT")
        echo "-P OUTPUT ACCEPT"
        i=0
        while [ "$i" -lt "${STUB_OUT_JUMPS:-0}" ]; do
            echo "-A OUTPUT -p tcp -j SIDECAR_OUTPUT"
            i=$((i + 1))
        done
        exit 0 ;;
esac
if [ -n "${STUB_FAIL:-}" ]; then
    case "$*" in
        *"$STUB_FAIL"*) echo "$name: stand-in failure" >&2; exit 1 ;;
    esac
fi
exit 0
"""

STUB_NAMES = [
    f"{family}{suffix}{save}"
    for family in ("iptables", "ip6tables")
    for suffix in ("", "-nft", "-legacy")
    for save in ("", "-save")
]


def freshRules(iptables: str, proxy: int = 8000, excluded: Iterable[int] = (8443, 15000),
               captured: Iterable[int] = (80,)) -> list[str]:
    """
    The commands that set up a pod whose nat table holds nothing of ours.

    @param iptables: the command, such as C{iptables-nft}.
    @param proxy: the proxy port.
    @param excluded: the excluded ports after the proxy port, in order.
    @param captured: the redirected ports, in order.
    @return: one command line per change, as the script prints them.
    """
    prefix = f"{iptables} -w 5 -t nat"
    return [
        f"{prefix} -N {CHAIN}",
        *chainRules(iptables, proxy, excluded, captured),
        f"{prefix} -A PREROUTING -p tcp -j {CHAIN}",
    ]


def chainRules(iptables: str, proxy: int = 8000, excluded: Iterable[int] = (8443, 15000),
               captured: Iterable[int] = (80,)) -> list[str]:
    """
    The commands that fill the chain.

    @param iptables: the command, such as C{iptables-nft}.
    @param proxy: the proxy port.
    @param excluded: the excluded ports after the proxy port, in order.
    @param captured: the redirected ports, in order.
    @return: one command line per rule.
    """
    prefix = f"{iptables} -w 5 -t nat -A {CHAIN}"
    return [
        f"{prefix} -i lo -j RETURN",
        *(f"{prefix} -p tcp --dport {port} -j RETURN" for port in (proxy, *excluded)),
        *(f"{prefix} -p tcp --dport {port} -j REDIRECT --to-ports {proxy}" for port in captured),
    ]


def changes(calls: list[str]) -> list[str]:
    """
    Keep the calls that change rules.

    @param calls: every recorded call.
    @return: those that are not C{-S} queries or C{*-save} dumps.
    """
    return [
        call for call in calls
        if " -S " not in call and not call.split()[0].endswith("-save")
    ]


class StandInCase(TestCase):
    """
    A test case that runs the script against stand-in iptables commands.
    """

    def setUp(self) -> None:
        """
        Put the stand-ins first on C{PATH}; start from an environment with no
        C{SIDECAR_*} variable and with IPv6 off unless a test turns it on.
        """
        self.bin = FilePath(self.mktemp())
        self.bin.makedirs()
        for name in STUB_NAMES:
            stub = self.bin.child(name)
            stub.setContent(STUB.encode())
            stub.chmod(0o755)
        self.log = FilePath(self.mktemp())
        self.log.touch()
        self.env = {
            name: value for name, value in os.environ.items()
            if not name.startswith(("SIDECAR_", "STUB_"))
        }
        self.env["PATH"] = self.bin.path + os.pathsep + self.env.get("PATH", "/usr/bin:/bin")
        self.env["STUB_LOG"] = self.log.path
        self.env["SIDECAR_IPV6"] = "off"

    def script(self, *argv: str, **env: str):
        """
        Run the script.

        @param argv: its arguments.
        @param env: environment variables to add.
        @return: a L{Deferred} firing with C{(stdout, stderr, exit code)},
            the outputs as text.
        """
        d = getProcessOutputAndValue(
            "/bin/sh", (SCRIPT.path, *argv), env={**self.env, **env}
        )
        return d.addCallback(lambda r: (r[0].decode(), r[1].decode(), r[2]))

    def calls(self) -> list[str]:
        """
        @return: every stand-in call so far, one line each.
        """
        return self.log.getContent().decode().splitlines()


class StandInTests(StandInCase):
    """
    The script's commands, run against stand-in iptables commands.
    """

    def test_shellcheckFindsNothing(self):
        """
        C{shellcheck} reports nothing about the script.
        """
        shellcheck = shutil.which("shellcheck")
        if shellcheck is None:
            raise SkipTest("needs the shellcheck program (apt-get install shellcheck)")
        d = getProcessOutputAndValue(shellcheck, (SCRIPT.path,), env=dict(os.environ))
        d.addCallback(lambda r: self.assertEqual((r[0], r[2]), (b"", 0)))
        return d

    @inlineCallbacks
    def test_helpNamesEveryOption(self):
        """
        C{-h} prints a usage text naming every option and its environment
        variable, inbound and outbound, and exits 0 without touching iptables.
        """
        out, _, code = yield self.script("-h")
        self.assertEqual(code, 0)
        for word in ("-p PORT", "-b PORTS", "-d PORTS", "-a PORT", "-t PORT", "-B BACKEND",
                     "-o PORT", "-u UIDS", "-g GIDS", "-i CIDRS", "-x CIDRS", "-q PORTS",
                     "-n", "clean", "SIDECAR_PROXY_PORT", "SIDECAR_INBOUND_PORTS",
                     "SIDECAR_EXCLUDE_PORTS", "SIDECAR_ADMIN_PORT", "SIDECAR_TLS_PORT",
                     "SIDECAR_IPTABLES", "SIDECAR_DRY_RUN", "SIDECAR_IPV6",
                     "SIDECAR_OUTBOUND_PORT", "SIDECAR_PROXY_UID", "SIDECAR_PROXY_GID",
                     "SIDECAR_OUTBOUND_CIDRS", "SIDECAR_OUTBOUND_EXCLUDE_CIDRS",
                     "SIDECAR_OUTBOUND_EXCLUDE_PORTS"):
            self.assertIn(word, out)
        self.assertEqual(self.calls(), [])

    @inlineCallbacks
    def test_freshPodGetsChainRulesAndOneJump(self):
        """
        In a pod with nothing of ours, the script creates C{SIDECAR_INBOUND},
        returns loopback traffic and the proxy's own ports (8000, TLS 8443,
        admin 15000), redirects port 80 to 8000, jumps to the chain from
        C{PREROUTING} for TCP last, and prints the resulting nat table.
        """
        out, err, code = yield self.script("-B", "nft")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(changes(self.calls()), freshRules("iptables-nft"))
        self.assertEqual(self.calls()[-1], "iptables-nft-save -t nat")
        self.assertIn("# rules as iptables-nft-save prints them", out)

    @inlineCallbacks
    def test_dryRunPrintsCommandsAndChangesNothing(self):
        """
        C{-n} prints the commands that would change the rules, one a line,
        and runs only read-only queries.
        """
        out, err, code = yield self.script("-n", "-B", "nft")
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines(), freshRules("iptables-nft"))
        self.assertIn("dry run", err)
        self.assertEqual(changes(self.calls()), [])

    @inlineCallbacks
    def test_dryRunFromEnvironment(self):
        """
        C{SIDECAR_DRY_RUN=1} is the same as C{-n}.
        """
        out, _, code = yield self.script("-B", "nft", SIDECAR_DRY_RUN="1")
        self.assertEqual((code, out.splitlines()), (0, freshRules("iptables-nft")))
        self.assertEqual(changes(self.calls()), [])

    @inlineCallbacks
    def test_secondRunRefillsTheChain(self):
        """
        When the chain and its jump are already there, the script flushes the
        chain and fills it again, and adds no second jump, so running it twice
        gives the same rules as running it once.
        """
        _, _, code = yield self.script(
            "-B", "nft", STUB_HAS_CHAIN="iptables-nft", STUB_JUMPS="1"
        )
        self.assertEqual(code, 0)
        self.assertEqual(
            changes(self.calls()),
            [f"iptables-nft -w 5 -t nat -F {CHAIN}", *chainRules("iptables-nft")],
        )

    @inlineCallbacks
    def test_extraJumpsAreRemoved(self):
        """
        If C{PREROUTING} jumps to the chain more than once, the extra jumps go.
        """
        _, _, code = yield self.script(
            "-B", "nft", STUB_HAS_CHAIN="iptables-nft", STUB_JUMPS="3"
        )
        self.assertEqual(code, 0)
        self.assertEqual(
            changes(self.calls())[-2:],
            [f"iptables-nft -w 5 -t nat -D PREROUTING -p tcp -j {CHAIN}"] * 2,
        )

    @inlineCallbacks
    def test_everyPortExceptExcluded(self):
        """
        C{-b '*'} redirects every TCP port but the excluded ones; C{-d} adds
        exclusions after the proxy's own ports, each port once.
        """
        out, _, code = yield self.script("-n", "-B", "nft", "-b", "*", "-d", "22,8000,15000,5432")
        self.assertEqual(code, 0)
        prefix = f"iptables-nft -w 5 -t nat -A {CHAIN}"
        self.assertEqual(
            out.splitlines(),
            [
                f"iptables-nft -w 5 -t nat -N {CHAIN}",
                f"{prefix} -i lo -j RETURN",
                *(f"{prefix} -p tcp --dport {port} -j RETURN" for port in (8000, 8443, 15000, 22, 5432)),
                f"{prefix} -p tcp -j REDIRECT --to-ports 8000",
                f"iptables-nft -w 5 -t nat -A PREROUTING -p tcp -j {CHAIN}",
            ],
        )

    @inlineCallbacks
    def test_emptyInboundPortsCaptureNothing(self):
        """
        An empty C{-b} installs the chain with its exclusions but redirects
        nothing.
        """
        out, _, code = yield self.script("-n", "-B", "nft", "-b", "")
        self.assertEqual(code, 0)
        self.assertNotIn("REDIRECT", out)

    @inlineCallbacks
    def test_environmentConfigures(self):
        """
        Every option can come from its C{SIDECAR_*} variable; an empty admin
        or TLS port excludes nothing for it.
        """
        out, _, code = yield self.script(
            "-n",
            SIDECAR_IPTABLES="legacy",
            SIDECAR_PROXY_PORT="9000",
            SIDECAR_INBOUND_PORTS="80,8080",
            SIDECAR_EXCLUDE_PORTS="9090",
            SIDECAR_ADMIN_PORT="",
            SIDECAR_TLS_PORT="",
        )
        self.assertEqual(code, 0)
        self.assertEqual(
            out.splitlines(),
            freshRules("iptables-legacy", proxy=9000, excluded=(9090,), captured=(80, 8080)),
        )

    @inlineCallbacks
    def test_flagsWinOverEnvironment(self):
        """
        A flag overrides its environment variable.
        """
        out, _, code = yield self.script(
            "-n", "-B", "nft", "-p", "9100", "-a", "9901", "-t", "9443",
            SIDECAR_PROXY_PORT="9000", SIDECAR_IPTABLES="legacy",
        )
        self.assertEqual(code, 0)
        self.assertEqual(
            out.splitlines(), freshRules("iptables-nft", proxy=9100, excluded=(9443, 9901))
        )

    @inlineCallbacks
    def test_ipv6Mirrors(self):
        """
        With IPv6, the same rules go into C{ip6tables} of the same backend,
        and both tables are printed.
        """
        out, _, code = yield self.script("-B", "nft", SIDECAR_IPV6="on")
        self.assertEqual(code, 0)
        self.assertEqual(
            changes(self.calls()), freshRules("iptables-nft") + freshRules("ip6tables-nft")
        )
        self.assertIn("# rules as iptables-nft-save prints them", out)
        self.assertIn("# rules as ip6tables-nft-save prints them", out)

    @inlineCallbacks
    def test_autoPrefersNft(self):
        """
        With no chain anywhere, the automatic backend is nft.
        """
        out, _, code = yield self.script("-n")
        self.assertEqual((code, out.splitlines()), (0, freshRules("iptables-nft")))

    @inlineCallbacks
    def test_autoFallsBackToLegacy(self):
        """
        When nft cannot read its nat table, the automatic backend is legacy.
        """
        out, _, code = yield self.script("-n", STUB_UNUSABLE="iptables-nft")
        self.assertEqual((code, out.splitlines()), (0, freshRules("iptables-legacy")))

    @inlineCallbacks
    def test_cleanRemovesJumpsThenChain(self):
        """
        C{clean} deletes every jump to the chain, then flushes and deletes the
        chain, touches nothing else, and prints the nat table.
        """
        out, _, code = yield self.script(
            "-B", "nft", "clean", STUB_HAS_CHAIN="iptables-nft", STUB_JUMPS="2"
        )
        self.assertEqual(code, 0)
        prefix = "iptables-nft -w 5 -t nat"
        self.assertEqual(
            changes(self.calls()),
            [f"{prefix} -D PREROUTING -p tcp -j {CHAIN}"] * 2
            + [f"{prefix} -F {CHAIN}", f"{prefix} -X {CHAIN}"],
        )
        self.assertIn("# rules as iptables-nft-save prints them", out)

    @inlineCallbacks
    def test_cleanWithNothingThere(self):
        """
        C{clean} where the script never ran changes nothing and succeeds.
        """
        _, _, code = yield self.script("-B", "nft", "clean")
        self.assertEqual((code, changes(self.calls())), (0, []))

    @inlineCallbacks
    def test_cleanFindsIPv6RulesLeftBehind(self):
        """
        C{clean} also removes the IPv6 chain when it is there, even if the pod
        no longer has an IPv6 address.
        """
        _, _, code = yield self.script(
            "-B", "nft", "clean", SIDECAR_IPV6="auto", STUB_HAS_CHAIN="ip6tables-nft"
        )
        self.assertEqual(code, 0)
        self.assertIn(f"ip6tables-nft -w 5 -t nat -X {CHAIN}", changes(self.calls()))

    @inlineCallbacks
    def test_failureExitsNonZero(self):
        """
        If any iptables command fails, the script stops at once, says which
        command failed, and exits non-zero, so the pod does not start
        uncaptured.
        """
        out, err, code = yield self.script("-B", "nft", STUB_FAIL="-A PREROUTING")
        self.assertEqual(code, 1)
        self.assertIn("-A PREROUTING -p tcp -j SIDECAR_INBOUND", err)
        self.assertIn("failed", err)
        self.assertNotIn("-save", "\n".join(self.calls()))

    @inlineCallbacks
    def test_missingIptablesIsAnError(self):
        """
        Without the backend's command the script says so and exits non-zero.
        """
        tools = FilePath(self.mktemp())
        tools.makedirs()
        for tool in ("grep", "tr"):
            FilePath(shutil.which(tool)).linkTo(tools.child(tool))  # type: ignore[arg-type]
        out, err, code = yield self.script("-B", "nft", PATH=tools.path)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("cannot find iptables-nft", err)

    @inlineCallbacks
    def test_badInputIsOneSentence(self):
        """
        A bad port, port list, id list, CIDR list, backend, option or
        argument, or an outbound option without outbound capture or outbound
        capture without the proxy's owner, gets one sentence on stderr naming
        it (and a pointer to C{-h}), exit status 2, and no iptables call.
        """
        out = ("-o", "15001", "-u", "1337")
        cases = [
            (("-p", "0"), {}, "-p"),
            (("-p", "65536"), {}, "-p"),
            (("-p", "http"), {}, "'http'"),
            (("-b", "80,x"), {}, "'x'"),
            (("-d", "8,,9"), {}, "-d"),
            (("-a", "-1"), {}, "-a"),
            (("-B", "iptables"), {}, "auto, nft or legacy"),
            ((), {"SIDECAR_IPTABLES": "nf"}, "'nf'"),
            (("-o", "15001"), {}, "-u"),
            (("-o", "http", "-u", "1"), {}, "-o"),
            (("-o", "15001", "-u", "istio-proxy"), {}, "'istio-proxy'"),
            (("-o", "15001", "-g", "1,,2"), {}, "-g"),
            (("-o", "15001", "-u", "4294967295"), {}, "'4294967295'"),
            ((*out, "-i", "10.0.0.0/33"), {}, "'10.0.0.0/33'"),
            ((*out, "-i", "10.0.0.0/"), {}, "'10.0.0.0/'"),
            ((*out, "-i", "010.0.0.0/8"), {}, "'010.0.0.0/8'"),
            ((*out, "-i", "10.0.0/8"), {}, "'10.0.0/8'"),
            ((*out, "-i", "256.0.0.0/8"), {}, "'256.0.0.0/8'"),
            ((*out, "-x", "2001:db8:::1"), {}, "'2001:db8:::1'"),
            ((*out, "-x", "1:2:3:4:5:6:7:8:9"), {}, "'1:2:3:4:5:6:7:8:9'"),
            ((*out, "-x", "2001:db8::/129"), {}, "'2001:db8::/129'"),
            ((*out, "-x", "fe80::1%eth0"), {}, "'fe80::1%eth0'"),
            ((*out, "-x", "*"), {}, "-x"),
            ((*out, "-x", "10.0.0.0/8,,"), {}, "-x"),
            ((*out, "-q", "5432,0"), {}, "'0'"),
            (("-u", "1337"), {}, "-u"),
            (("-g", "1337"), {}, "-g"),
            (("-i", "10.0.0.0/8"), {}, "-i"),
            (("-x", "10.0.0.0/8"), {}, "-x"),
            (("-q", "5432"), {}, "-q"),
            ((), {"SIDECAR_PROXY_UID": "1337"}, "-u"),
            ((), {"SIDECAR_OUTBOUND_PORT": "15001"}, "-u"),
            (("-z",), {}, "-z"),
            (("-p",), {}, "-p needs a value"),
            (("cleanup",), {}, "'cleanup'"),
            (("clean", "now"), {}, "now"),
            ((), {"SIDECAR_IPV6": "maybe"}, "SIDECAR_IPV6"),
            ((), {"SIDECAR_PROXY_PORT": "eighty"}, "'eighty'"),
        ]
        for argv, env, named in cases:
            out, err, code = yield self.script(*argv, **env)
            self.assertEqual((code, out), (2, ""), argv)
            first, hint = err.splitlines()
            self.assertTrue(first.startswith("sidecar-iptables: "), err)
            self.assertTrue(first.endswith("."), err)
            self.assertIn(named, first)
            self.assertIn("-h", hint)
        self.assertEqual(self.calls(), [])


GOLDEN = FilePath(__file__).sibling("golden").child("iptables")

OUTBOUND_CHAINS = "SIDECAR_INBOUND SIDECAR_REDIRECT SIDECAR_IN_REDIRECT SIDECAR_OUTPUT"

# The golden cases: a file name under tests/golden/iptables/ (without
# ".golden"), the script's arguments after "-n -B nft", and the stand-ins'
# environment (IPv6 off unless a case turns it on).
GOLDEN_CASES: list[tuple[str, tuple[str, ...], dict[str, str]]] = [
    ("inbound-default", (), {}),
    ("inbound-only-ipv6", ("-b", "*", "-d", "22"), {"SIDECAR_IPV6": "on"}),
    ("outbound-uid", ("-o", "15001", "-u", "1337"), {}),
    ("outbound-gid", ("-o", "15001", "-g", "1337"), {}),
    ("outbound-uid-gid-ipv6", ("-o", "15001", "-u", "1337,1338", "-g", "1337"),
     {"SIDECAR_IPV6": "on"}),
    ("outbound-exclude", ("-o", "15001", "-u", "1337", "-x",
                          "10.96.0.0/12,fd00::/8,169.254.169.254", "-q", "5432,3306"),
     {"SIDECAR_IPV6": "on"}),
    ("outbound-include", ("-o", "15001", "-u", "1337", "-i", "10.0.0.0/8,2001:db8::/32"),
     {"SIDECAR_IPV6": "on"}),
    ("outbound-include-loopback", ("-o", "15001", "-u", "1337", "-i", "127.0.0.0/8,10.0.0.0/8"),
     {}),
    ("outbound-include-nothing", ("-o", "15001", "-u", "1337", "-i", ""), {}),
    ("outbound-no-inbound", ("-b", "", "-o", "15001", "-u", "1337"), {}),
    ("outbound-every-inbound-port", ("-b", "*", "-d", "22", "-p", "15006", "-t", "",
                                     "-o", "15001", "-u", "1337"), {}),
    ("outbound-environment", (), {
        "SIDECAR_OUTBOUND_PORT": "15001", "SIDECAR_PROXY_UID": "1337",
        "SIDECAR_PROXY_GID": "1338", "SIDECAR_OUTBOUND_CIDRS": "10.0.0.0/8",
        "SIDECAR_OUTBOUND_EXCLUDE_CIDRS": "10.96.0.0/12",
        "SIDECAR_OUTBOUND_EXCLUDE_PORTS": "22"}),
    ("outbound-rerun", ("-o", "15001", "-u", "1337"), {
        "STUB_HAS_CHAIN": "iptables-nft", "STUB_CHAINS": OUTBOUND_CHAINS,
        "STUB_JUMPS": "1", "STUB_OUT_JUMPS": "1"}),
    ("outbound-rerun-without-inbound", ("-b", "", "-o", "15001", "-u", "1337"), {
        "STUB_HAS_CHAIN": "iptables-nft", "STUB_CHAINS": OUTBOUND_CHAINS,
        "STUB_JUMPS": "1", "STUB_OUT_JUMPS": "1"}),
    ("outbound-turned-off", (), {
        "STUB_HAS_CHAIN": "iptables-nft", "STUB_CHAINS": OUTBOUND_CHAINS,
        "STUB_JUMPS": "1", "STUB_OUT_JUMPS": "2"}),
    ("clean-everything-ipv6", ("clean",), {
        "SIDECAR_IPV6": "on", "STUB_HAS_CHAIN": "iptables-nft ip6tables-nft",
        "STUB_CHAINS": OUTBOUND_CHAINS, "STUB_JUMPS": "1", "STUB_OUT_JUMPS": "1"}),
]


class GoldenTests(StandInCase):
    """
    The dry run's commands for a set of flag combinations, compared line for
    line with golden files, as Istio's istio-iptables tests do. With
    C{REFRESH_GOLDEN=1} in the environment the files are rewritten from what
    the script prints now (review the diff before committing it).
    """

    @inlineCallbacks
    def test_dryRunsMatchGoldenFiles(self):
        """
        For every case, the dry run exits 0 and prints exactly the commands of
        its golden file, and runs no command that changes anything.
        """
        refresh = os.environ.get("REFRESH_GOLDEN") == "1"
        for name, argv, env in GOLDEN_CASES:
            out, err, code = yield self.script("-n", "-B", "nft", *argv, **env)
            self.assertEqual(code, 0, f"{name}: {err}")
            golden = GOLDEN.child(f"{name}.golden")
            if refresh:
                GOLDEN.makedirs(ignoreExistingDirectory=True)
                golden.setContent(out.encode())
            self.assertEqual(out.splitlines(), golden.getContent().decode().splitlines(), name)
        self.assertEqual(changes(self.calls()), [])

    def test_everyGoldenFileHasItsCase(self):
        """
        No golden file is left over from a case that no longer exists.
        """
        names = {f"{name}.golden" for name, _, _ in GOLDEN_CASES}
        self.assertEqual({path.basename() for path in GOLDEN.children()}, names)

    @inlineCallbacks
    def test_outboundRulesInIstioOrder(self):
        """
        The outbound chain has Istio's order: excluded ports; then for each
        proxy user and group, its own-pod calls through the inbound rules, the
        application's loopback traffic returned, its own traffic returned;
        then loopback, excluded CIDRs, and the captured CIDRs last. The
        captured and redirect chains exist before anything jumps to them, and
        the OUTPUT jump comes last.
        """
        out, _, code = yield self.script(
            "-n", "-B", "nft", "-o", "15001", "-u", "1337", "-g", "1338",
            "-x", "10.96.0.0/12", "-q", "22", "-i", "10.0.0.0/8",
        )
        self.assertEqual(code, 0)
        prefix = "iptables-nft -w 5 -t nat -A SIDECAR_OUTPUT"
        lines = out.splitlines()
        self.assertEqual(
            [line for line in lines if line.startswith(prefix)],
            [
                f"{prefix} -p tcp --dport 22 -j RETURN",
                f"{prefix} -o lo ! -d 127.0.0.1/32 -p tcp -m owner --uid-owner 1337 -j SIDECAR_IN_REDIRECT",
                f"{prefix} -o lo -m owner ! --uid-owner 1337 -j RETURN",
                f"{prefix} -m owner --uid-owner 1337 -j RETURN",
                f"{prefix} -o lo ! -d 127.0.0.1/32 -p tcp -m owner --gid-owner 1338 -j SIDECAR_IN_REDIRECT",
                f"{prefix} -o lo -m owner ! --gid-owner 1338 -j RETURN",
                f"{prefix} -m owner --gid-owner 1338 -j RETURN",
                f"{prefix} -d 127.0.0.1/32 -j RETURN",
                f"{prefix} -d 10.96.0.0/12 -j RETURN",
                f"{prefix} -d 10.0.0.0/8 -j SIDECAR_REDIRECT",
            ],
        )
        created = [lines.index(f"iptables-nft -w 5 -t nat -N {chain}")
                   for chain in OUTBOUND_CHAINS.split()]
        firstRule = min(i for i, line in enumerate(lines) if " -A " in line)
        self.assertTrue(max(created) < firstRule, lines)
        self.assertEqual(lines[-1], "iptables-nft -w 5 -t nat -A OUTPUT -p tcp -j SIDECAR_OUTPUT")

    @inlineCallbacks
    def test_outboundRerunKeepsOneJumpEach(self):
        """
        A second run with outbound capture flushes and refills all four chains,
        adds no jump, and deletes extra OUTPUT jumps down to one.
        """
        _, _, code = yield self.script(
            "-B", "nft", "-o", "15001", "-u", "1337", STUB_HAS_CHAIN="iptables-nft",
            STUB_CHAINS=OUTBOUND_CHAINS, STUB_JUMPS="1", STUB_OUT_JUMPS="3",
        )
        self.assertEqual(code, 0)
        made = changes(self.calls())
        self.assertEqual(
            [call for call in made if " -N " in call or " -X " in call], []
        )
        self.assertEqual(
            [call.split()[-1] for call in made if " -F " in call], OUTBOUND_CHAINS.split()
        )
        self.assertEqual(
            [call for call in made if "OUTPUT -p tcp" in call or "PREROUTING" in call],
            ["iptables-nft -w 5 -t nat -D OUTPUT -p tcp -j SIDECAR_OUTPUT"] * 2,
        )

    @inlineCallbacks
    def test_oldBackendSpellingStillWorks(self):
        """
        C{-i nft}, C{-i legacy} and C{-i auto}, the backend's flag before
        outbound capture took C{-i} for Istio's included CIDRs, still choose
        the backend, with or without outbound capture.
        """
        out, _, code = yield self.script("-n", "-i", "legacy")
        self.assertEqual((code, out.splitlines()), (0, freshRules("iptables-legacy")))
        out, _, code = yield self.script("-n", "-i", "nft", "-o", "15001", "-u", "1")
        self.assertEqual(code, 0)
        self.assertIn("iptables-nft -w 5 -t nat -A SIDECAR_OUTPUT -j SIDECAR_REDIRECT", out)

    @inlineCallbacks
    def test_outboundFailureExitsNonZero(self):
        """
        If the OUTPUT jump cannot be added, the script says which command
        failed and exits non-zero, so the pod does not start half captured.
        """
        _, err, code = yield self.script(
            "-B", "nft", "-o", "15001", "-u", "1337", STUB_FAIL="-A OUTPUT"
        )
        self.assertEqual(code, 1)
        self.assertIn("-A OUTPUT -p tcp -j SIDECAR_OUTPUT", err)


class RealBackendMixin:
    """
    The script against a real iptables backend in a namespace made for the
    test; mixed into a L{TestCase} that names the backend.

    @cvar backend: C{"nft"} or C{"legacy"}.
    """

    backend: str

    def setUp(self) -> None:
        """
        Skip, saying why, unless root with C{ip} and the backend's commands;
        then make a namespace with only C{lo}, so no IPv6 address.
        """
        reason = missingForNamespaces(
            (f"iptables-{self.backend}", f"ip6tables-{self.backend}",
             f"iptables-{self.backend}-save")
        )
        if reason is not None:
            raise SkipTest(reason)
        self.namespace = NetworkNamespace(self, "ipt")  # type: ignore[arg-type]

    def script(self, *argv: str, ipv6: str = "auto") -> str:
        """
        Run the script in the namespace with this backend; fail if it fails.

        @param argv: more arguments.
        @param ipv6: C{SIDECAR_IPV6}: C{"auto"}, C{"on"} or C{"off"}.
        @return: what it printed.
        """
        return self.namespace.run(
            ["env", f"SIDECAR_IPV6={ipv6}", "sh", SCRIPT.path, "-B", self.backend, *argv]
        ).stdout

    def trace(self, family: str = "iptables") -> list[str]:
        """
        @param family: C{"iptables"} or C{"ip6tables"}.
        @return: the namespace's nat rules and custom chains.
        """
        return ourTrace(
            self.namespace.run([f"{family}-{self.backend}-save", "-t", "nat"]).stdout
        )

    def test_realRulesAcceptEveryOption(self):
        """
        The kernel accepts the rules for every port but exclusions, with a
        non-default proxy port, and the printed table shows them.
        """
        return deferToThread(self._everyOption)

    def _everyOption(self) -> None:
        out = self.script("-p", "15001", "-b", "*", "-d", "22,5432", "-a", "15020", "-t", "")
        self.assertEqual(
            self.trace(),
            [
                f":{CHAIN} -",
                f"-A PREROUTING -p tcp -j {CHAIN}",
                f"-A {CHAIN} -i lo -j RETURN",
                *(f"-A {CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
                  for port in (15001, 15020, 22, 5432)),
                f"-A {CHAIN} -p tcp -j REDIRECT --to-ports 15001",
            ],
        )
        self.assertIn(f"-A {CHAIN} -p tcp -j REDIRECT --to-ports 15001", out)

    def test_realOutboundRules(self):
        """
        The kernel accepts the outbound rules for IPv4 and IPv6, in Istio's
        order and with their loopback addresses; a second run leaves the same
        rules; a run without C{-o} removes the outbound chains and jump and
        keeps the inbound ones; C{clean} removes everything in both families.
        """
        return deferToThread(self._outboundRules)

    def _outboundRules(self) -> None:
        argv = ["-o", "15001", "-u", "1337", "-g", "1338", "-q", "22",
                "-x", "10.96.0.0/12,fd00::/8", "-i", "10.0.0.0/8,2001:db8::/32"]
        self.script(*argv, ipv6="on")
        for family, loopback, excluded, included in (
            ("iptables", "127.0.0.1/32", "10.96.0.0/12", "10.0.0.0/8"),
            ("ip6tables", "::1/128", "fd00::/8", "2001:db8::/32"),
        ):
            out = "-A SIDECAR_OUTPUT"
            self.assertEqual(
                self.trace(family),
                [
                    f":{CHAIN} -",
                    ":SIDECAR_IN_REDIRECT -",
                    ":SIDECAR_OUTPUT -",
                    ":SIDECAR_REDIRECT -",
                    f"-A PREROUTING -p tcp -j {CHAIN}",
                    "-A OUTPUT -p tcp -j SIDECAR_OUTPUT",
                    f"-A {CHAIN} -i lo -j RETURN",
                    *(f"-A {CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
                      for port in (8000, 8443, 15000)),
                    f"-A {CHAIN} -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8000",
                    *(f"-A SIDECAR_IN_REDIRECT -p tcp -m tcp --dport {port} -j RETURN"
                      for port in (8000, 8443, 15000)),
                    "-A SIDECAR_IN_REDIRECT -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8000",
                    f"{out} -p tcp -m tcp --dport 22 -j RETURN",
                    *(line
                      for owner in ("--uid-owner 1337", "--gid-owner 1338")
                      for line in (
                          f"{out} ! -d {loopback} -o lo -p tcp -m owner {owner} -j SIDECAR_IN_REDIRECT",
                          f"{out} -o lo -m owner ! {owner} -j RETURN",
                          f"{out} -m owner {owner} -j RETURN",
                      )),
                    f"{out} -d {loopback} -j RETURN",
                    f"{out} -d {excluded} -j RETURN",
                    f"{out} -d {included} -j SIDECAR_REDIRECT",
                    "-A SIDECAR_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                ],
                family,
            )
        saved = {family: normalizedRules(self.namespace.run(
            [f"{family}-{self.backend}-save", "-t", "nat"]).stdout)
            for family in ("iptables", "ip6tables")}
        self.script(*argv, ipv6="on")
        self.assertEqual(
            {family: normalizedRules(self.namespace.run(
                [f"{family}-{self.backend}-save", "-t", "nat"]).stdout)
             for family in ("iptables", "ip6tables")},
            saved,
        )
        self.script(ipv6="on")
        inboundOnly = [line for line in self.trace() if "SIDECAR_INBOUND" in line]
        self.assertEqual(self.trace(), inboundOnly)
        self.assertEqual(self.trace("ip6tables"), inboundOnly)
        self.script(*argv, ipv6="on")
        self.script("clean")
        self.assertEqual((self.trace("iptables"), self.trace("ip6tables")), ([], []))

    def test_ipv6FollowsThePod(self):
        """
        A pod with only loopback gets IPv4 rules alone; once it has an IPv6
        address on another interface, the rules are mirrored into
        C{ip6tables}, and C{clean} removes both.
        """
        return deferToThread(self._ipv6)

    def _ipv6(self) -> None:
        self.script()
        self.assertEqual(self.trace("ip6tables"), [])
        self.namespace.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        self.namespace.ip("addr", "add", "fd00:5ca:1::2/64", "dev", "eth0", "nodad")
        self.namespace.ip("link", "set", "eth0", "up")
        self.script()
        self.assertEqual(self.trace("ip6tables"), self.trace("iptables"))
        self.assertNotEqual(self.trace("ip6tables"), [])
        self.script("clean")
        self.assertEqual((self.trace("iptables"), self.trace("ip6tables")), ([], []))

    def test_dryRunChangesNothing(self):
        """
        A dry run in a real namespace prints the commands and leaves the nat
        table as it was, both before and after a real run.
        """
        return deferToThread(self._dryRun)

    def _dryRun(self) -> None:
        printed = self.script("-n")
        self.assertIn(f"-N {CHAIN}", printed)
        self.assertEqual(self.trace(), [])
        self.script()
        installed = self.trace()
        printed = self.script("-n", "clean")
        self.assertIn(f"-X {CHAIN}", printed)
        self.assertEqual(self.trace(), installed)

    def test_cleanWhereNothingRan(self):
        """
        C{clean} in a namespace where the script never ran succeeds and leaves
        no rule.
        """
        return deferToThread(self._cleanNothing)

    def _cleanNothing(self) -> None:
        self.script("clean")
        self.assertEqual(self.trace(), [])

    def test_rerunKeepsRules(self):
        """
        Running the script again changes no rule (counters aside).
        """
        return deferToThread(self._rerun)

    def _rerun(self) -> None:
        self.script()
        save = [f"iptables-{self.backend}-save", "-t", "nat"]
        once = normalizedRules(self.namespace.run(save).stdout)
        self.script()
        self.assertEqual(normalizedRules(self.namespace.run(save).stdout), once)


class NftBackendTests(RealBackendMixin, TestCase):
    """
    The script against C{iptables-nft}.
    """

    backend = "nft"


class LegacyBackendTests(RealBackendMixin, TestCase):
    """
    The script against C{iptables-legacy}.
    """

    backend = "legacy"


class AutoBackendTests(TestCase):
    """
    The automatic backend choice against the real backends.
    """

    def setUp(self) -> None:
        """
        Skip, saying why, unless root with C{ip} and both backends.
        """
        reason = missingForNamespaces(
            ("iptables-nft", "iptables-legacy", "iptables-nft-save", "iptables-legacy-save")
        )
        if reason is not None:
            raise SkipTest(reason)
        self.namespace = NetworkNamespace(self, "ipt")

    def test_autoKeepsRulesInTheLegacyBackend(self):
        """
        After a run with the legacy backend, an automatic run and an automatic
        C{clean} act on the legacy rules and put nothing into nft.
        """
        return deferToThread(self._auto)

    def _auto(self) -> None:
        def trace(backend: str) -> list[str]:
            return ourTrace(self.namespace.run([f"iptables-{backend}-save", "-t", "nat"]).stdout)

        self.namespace.run(["sh", SCRIPT.path, "-B", "legacy"])
        legacy = trace("legacy")
        self.namespace.run(["sh", SCRIPT.path])
        self.assertEqual((trace("legacy"), trace("nft")), (legacy, []))
        self.namespace.run(["sh", SCRIPT.path, "clean"])
        self.assertEqual((trace("legacy"), trace("nft")), ([], []))

    def test_autoLeavesLegacyAlone(self):
        """
        An automatic run and C{clean} in a namespace without legacy tables use
        nft and do not create an empty legacy nat table by looking for one.
        """
        return deferToThread(self._nftOnly)

    def _nftOnly(self) -> None:
        def legacyTables() -> str:
            return self.namespace.run(["cat", "/proc/net/ip_tables_names"], check=False).stdout

        before = legacyTables()
        self.namespace.run(["sh", SCRIPT.path])
        self.assertIn(f":{CHAIN} -", ourTrace(
            self.namespace.run(["iptables-nft-save", "-t", "nat"]).stdout))
        self.namespace.run(["sh", SCRIPT.path, "clean"])
        self.assertEqual(legacyTables(), before)


# A tiny TCP server for the traffic tests: argv is a label and the addresses
# to listen on ("HOST,PORT"). It prints "ready" once listening, then answers
# every connection with one line, "LABEL ORIGINAL-DESTINATION", where the
# original destination is what SO_ORIGINAL_DST says (the address the client
# asked for, before any REDIRECT), or the local address where no connection
# tracking took place, and closes it.
LABEL_SERVER = r"""
import selectors, socket, struct, sys
SO_ORIGINAL_DST = 80
label = sys.argv[1]
selector = selectors.DefaultSelector()
for spec in sys.argv[2:]:
    host, port = spec.rsplit(",", 1)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    listener.bind((host, int(port)))
    listener.listen(16)
    selector.register(listener, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in selector.select():
        connection, _ = key.fileobj.accept()
        try:
            if connection.family == socket.AF_INET6:
                raw = connection.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
                port = struct.unpack("!H", raw[2:4])[0]
                original = "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port)
            else:
                raw = connection.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
                port = struct.unpack("!H", raw[2:4])[0]
                original = "%s:%d" % (socket.inet_ntoa(raw[4:8]), port)
        except OSError:
            local = connection.getsockname()
            original = ("[%s]:%d" if ":" in local[0] else "%s:%d") % local[:2]
        connection.sendall(("%s %s\n" % (label, original)).encode())
        connection.close()
"""

# The client: connects to HOST PORT and prints the server's line, or
# "refused"/"timeout".
LABEL_CLIENT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        print(s.makefile().readline().strip())
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
"""

# The user and group ids of the proxy and of the application in the traffic
# tests; neither needs to exist in /etc/passwd.
PROXY_ID = 1337
APP_ID = 1000

POD_V4, PEER_V4 = "192.0.2.1", "192.0.2.2"          # TEST-NET-1: captured
OTHER_POD_V4, OTHER_PEER_V4 = "198.51.100.1", "198.51.100.2"  # TEST-NET-2
POD_V6, PEER_V6 = "2001:db8:5ca::1", "2001:db8:5ca::2"  # documentation prefix


def unprivilegedPython() -> str:
    """
    Find a Python interpreter that the application's and the proxy's users
    can run (this one may live in a directory only root can enter).

    @return: its path.
    @raise SkipTest: if there is none.
    """
    for python in (sys.executable, "/usr/bin/python3"):
        for uid in (APP_ID, PROXY_ID):
            done = subprocess.run(
                ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                 python, "-I", "-c", "pass"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
            )
            if done.returncode != 0:
                break
        else:
            return python
    raise SkipTest(f"needs a Python that users {APP_ID} and {PROXY_ID} can run")


class OutboundTrafficMixin:
    """
    Real connections through the outbound rules: a pod namespace joined by a
    veth pair to a peer namespace, both made for the test, addressed from the
    documentation ranges (nothing leaves the two namespaces). Tiny servers
    answer with their name and the connection's original destination: the
    pod's outbound listener (127.0.0.1 and ::1 port 15001), its inbound proxy
    port (8000), its service (80), and the peer (7000 and 5432). Clients run
    as the application's or the proxy's user with C{setpriv}.

    @cvar backend: C{"nft"} or C{"legacy"}.
    """

    backend: str

    def setUp(self) -> None:
        """
        Skip, saying why, unless root with the programs; then make the pod and
        the peer, link them and start the servers.
        """
        reason = missingForNamespaces(
            (f"iptables-{self.backend}", f"ip6tables-{self.backend}",
             f"iptables-{self.backend}-save", "setpriv")
        )
        if reason is not None:
            raise SkipTest(reason)
        self.python = unprivilegedPython()
        self.pod = NetworkNamespace(self, "out")  # type: ignore[arg-type]
        self.peer = NetworkNamespace(self, "peer")  # type: ignore[arg-type]
        self.pod.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                    "netns", self.peer.name)
        for namespace, addresses in (
            (self.pod, (f"{POD_V4}/24", f"{OTHER_POD_V4}/24", f"{POD_V6}/64")),
            (self.peer, (f"{PEER_V4}/24", f"{OTHER_PEER_V4}/24", f"{PEER_V6}/64")),
        ):
            for address in addresses:
                namespace.ip("addr", "add", address, "dev", "eth0", "nodad")
            namespace.ip("link", "set", "eth0", "up")
        self.serve(self.pod, "outbound", ("127.0.0.1,15001", "::1,15001"))
        self.serve(self.pod, "inbound", ("0.0.0.0,8000", "::,8000"))
        self.serve(self.pod, "service", ("0.0.0.0,80", "::,80"))
        self.serve(self.peer, "peer", ("0.0.0.0,7000", "::,7000", "0.0.0.0,5432"))

    def serve(self, namespace: NetworkNamespace, label: str, addresses: tuple[str, ...]) -> None:
        """
        Start a L{LABEL_SERVER} in a namespace and wait until it listens; it is
        ended by its process id when the test ends.

        @param namespace: where.
        @param label: its name in its answers.
        @param addresses: C{"HOST,PORT"} to listen on.
        """
        output = FilePath(self.mktemp())  # type: ignore[attr-defined]
        output.parent().makedirs(ignoreExistingDirectory=True)
        with output.open("w") as sink:
            process = subprocess.Popen(
                namespace.execArgv([sys.executable, "-I", "-c", LABEL_SERVER, label, *addresses]),
                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
            )
        self.addCleanup(stopProcess, process)  # type: ignore[attr-defined]
        pollUntil(
            lambda: b"ready" in output.getContent() or process.poll() is not None,
            lambda: f"the {label} server; its output: {output.getContent()!r}",
        )
        if process.poll() is not None:
            raise AssertionError(f"the {label} server exited: {output.getContent()!r}")

    def connect(self, host: str, port: int, uid: int = APP_ID, gid: int | None = None,
                namespace: NetworkNamespace | None = None) -> str:
        """
        Connect from the pod as a given user and group, and say who answered.

        @param host: the address to connect to.
        @param port: the port.
        @param uid: the client's user id.
        @param gid: its group id (by default the same number as C{uid}).
        @param namespace: where the client runs (by default the pod), as root
            when it is not the pod.
        @return: the answering server's line, such as C{"peer 192.0.2.2:7000"}.
        """
        client = [self.python, "-I", "-c", LABEL_CLIENT, host, str(port)]
        if namespace is None:
            namespace = self.pod
            client = ["setpriv", f"--reuid={uid}", f"--regid={uid if gid is None else gid}",
                      "--clear-groups", *client]
        return namespace.run(client).stdout.strip()

    def script(self, *argv: str) -> None:
        """
        Run the init script in the pod with this backend (IPv6 follows the
        pod, which has an IPv6 address); fail if it fails.

        @param argv: its arguments.
        """
        self.pod.run(["sh", SCRIPT.path, "-B", self.backend, *argv])

    def test_outboundTraffic(self):
        """
        With C{-o 15001 -u 1337 -x 198.51.100.0/24 -q 5432}: the
        application's connections to the peer, over IPv4 and IPv6, land on
        the outbound listener, which reads the peer's address as their
        original destination; the proxy's own connections reach the peer;
        loopback and the pod's own address reach the service directly from
        the application; the proxy calling its own pod's address goes through
        the inbound proxy port; the excluded CIDR and port reach the peer;
        and the peer's connections to the pod still go inbound. Running it
        again changes nothing.
        """
        return deferToThread(self._outbound)

    def _outbound(self) -> None:
        argv = ("-p", "8000", "-b", "80", "-o", "15001", "-u", str(PROXY_ID),
                "-x", "198.51.100.0/24", "-q", "5432")
        self.script(*argv)
        self.script(*argv)
        connect = self.connect
        expected = [
            ((PEER_V4, 7000), {}, f"outbound {PEER_V4}:7000"),
            ((PEER_V6, 7000), {}, f"outbound [{PEER_V6}]:7000"),
            ((PEER_V4, 7000), {"uid": PROXY_ID}, f"peer {PEER_V4}:7000"),
            ((PEER_V6, 7000), {"uid": PROXY_ID}, f"peer [{PEER_V6}]:7000"),
            (("127.0.0.1", 80), {}, "service 127.0.0.1:80"),
            (("::1", 80), {}, "service [::1]:80"),
            ((POD_V4, 80), {}, f"service {POD_V4}:80"),
            (("127.0.0.1", 80), {"uid": PROXY_ID}, "service 127.0.0.1:80"),
            ((POD_V4, 80), {"uid": PROXY_ID}, f"inbound {POD_V4}:80"),
            ((POD_V6, 80), {"uid": PROXY_ID}, f"inbound [{POD_V6}]:80"),
            ((OTHER_PEER_V4, 7000), {}, f"peer {OTHER_PEER_V4}:7000"),
            ((PEER_V4, 5432), {}, f"peer {PEER_V4}:5432"),
            ((POD_V4, 80), {"namespace": self.peer}, f"inbound {POD_V4}:80"),
        ]
        answers = [connect(*where, **who) for where, who, _ in expected]  # type: ignore[arg-type]
        self.assertEqual(answers, [answer for _, _, answer in expected])

    def test_groupAndIncludedCIDRs(self):
        """
        With C{-g 1337 -i 192.0.2.0/24}: a process of any user in the proxy's
        group reaches the peer directly; the application's connections to the
        included network land on the outbound listener and those to other
        networks, IPv4 or IPv6, reach the peer.
        """
        return deferToThread(self._groupAndIncluded)

    def _groupAndIncluded(self) -> None:
        self.script("-o", "15001", "-g", str(PROXY_ID), "-i", "192.0.2.0/24")
        self.assertEqual(
            [
                self.connect(PEER_V4, 7000),
                self.connect(PEER_V4, 7000, uid=APP_ID, gid=PROXY_ID),
                self.connect(OTHER_PEER_V4, 7000),
                self.connect(PEER_V6, 7000),
            ],
            [f"outbound {PEER_V4}:7000", f"peer {PEER_V4}:7000",
             f"peer {OTHER_PEER_V4}:7000", f"peer [{PEER_V6}]:7000"],
        )

    def test_cleanStopsCapture(self):
        """
        After C{clean}, the application's connections reach the peer directly
        and no rule of ours is left, in either family.
        """
        return deferToThread(self._clean)

    def _clean(self) -> None:
        self.script("-o", "15001", "-u", str(PROXY_ID))
        self.assertEqual(self.connect(PEER_V4, 7000), f"outbound {PEER_V4}:7000")
        self.script("clean")
        self.assertEqual(
            [self.connect(PEER_V4, 7000), self.connect(PEER_V6, 7000)],
            [f"peer {PEER_V4}:7000", f"peer [{PEER_V6}]:7000"],
        )
        for family in ("iptables", "ip6tables"):
            saved = self.pod.run([f"{family}-{self.backend}-save", "-t", "nat"]).stdout
            self.assertEqual(ourTrace(saved), [], family)


class NftOutboundTrafficTests(OutboundTrafficMixin, TestCase):
    """
    Outbound capture with C{iptables-nft}.
    """

    backend = "nft"


class LegacyOutboundTrafficTests(OutboundTrafficMixin, TestCase):
    """
    Outbound capture with C{iptables-legacy}.
    """

    backend = "legacy"
