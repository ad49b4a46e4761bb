# -*- test-case-name: tests.test_lifecycle_options -*-
"""
Tests for the admin, drain, readiness and metrics-label flags of L{sidecar.tap.Options}:
their defaults, and one sentence naming the flag for each bad value.
"""

from __future__ import annotations

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from sidecar.config import LifecycleConfig
from sidecar.tap import Options


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(["--upstream", "8080", *argv])
    return options


class LifecycleOptionsTests(SynchronousTestCase):
    """
    C{--admin}, C{--drain-timeout}, C{--shutdown-grace}, C{--wait-for-upstream},
    C{--ready-requires-upstream}.
    """

    def test_defaults(self) -> None:
        """
        By default the admin site listens on port 15000 of the loopback interface only,
        the health port on 15021 of every interface, the drain lasts 5 s, the grace
        20 s, and readiness waits for nothing.
        """
        config = parse()["config"]
        self.assertEqual(config.admin, "tcp:15000:interface=127.0.0.1")
        self.assertEqual(config.health, "tcp:15021")
        self.assertEqual(config.lifecycle, LifecycleConfig(5.0, 20.0, False, None))

    def test_values(self) -> None:
        """
        Each flag lands in the configuration; C{--admin none} turns the admin site off.
        """
        config = parse("--admin", "none", "--drain-timeout", "0.5", "--shutdown-grace", "0",
                       "--wait-for-upstream", "30", "--ready-requires-upstream")["config"]
        self.assertIsNone(config.admin)
        self.assertEqual(config.lifecycle, LifecycleConfig(0.5, 0.0, True, 30.0))

    def test_bareAdminPortIsLoopback(self) -> None:
        """
        A bare C{--admin} port listens on loopback only (the admin site shows the
        configuration); every interface takes an endpoint that says so.  A bare
        C{--health} port listens on every interface; C{none} turns it off.
        """
        self.assertEqual(parse("--admin", "15001")["config"].admin, "tcp:15001:interface=127.0.0.1")
        self.assertEqual(parse("--admin", "tcp:15001")["config"].admin, "tcp:15001")
        self.assertEqual(parse("--health", "15090")["config"].health, "tcp:15090")
        self.assertEqual(parse("--health", "tcp:0:interface=127.0.0.1")["config"].health, "tcp:0:interface=127.0.0.1")
        self.assertIsNone(parse("--health", "none")["config"].health)

    def test_badValues(self) -> None:
        """
        A bad value stops the start with a sentence that names the flag.
        """
        for argv, flag in [
            (("--drain-timeout", "soon"), "--drain-timeout"),
            (("--drain-timeout", "-1"), "--drain-timeout"),
            (("--shutdown-grace", "nan"), "--shutdown-grace"),
            (("--wait-for-upstream", "inf"), "--wait-for-upstream"),
            (("--admin", "99999"), "--admin"),
            (("--admin", "bogus:thing"), "--admin"),
            (("--health", "70000"), "--health"),
            (("--health", "bogus:thing"), "--health"),
            (("--principal", "reviews"), "--principal"),
            (("--app", " "), "--app"),
        ]:
            e = self.assertRaises(usage.UsageError, parse, *argv)
            self.assertTrue(str(e).startswith(flag + ":"), (argv, str(e)))
            self.assertEqual(str(e).count(". "), 0, str(e))


class LabelOptionsTests(SynchronousTestCase):
    """
    The C{destination_*} label flags.
    """

    def test_flags(self) -> None:
        """
        The label flags fill the configuration's mesh labels; the service host follows
        from the app and namespace.
        """
        mesh = parse("--workload", "reviews-v1", "--namespace", "shop", "--app", "reviews",
                     "--app-version", "v1", "--principal", "spiffe://cluster.local/ns/shop/sa/reviews")["config"].mesh
        self.assertEqual((mesh.workload, mesh.namespace, mesh.app, mesh.version, mesh.service, mesh.principal),
                         ("reviews-v1", "shop", "reviews", "v1", "reviews.shop.svc.cluster.local",
                          "spiffe://cluster.local/ns/shop/sa/reviews"))

    def test_serviceHost(self) -> None:
        """
        C{--service-host} sets C{destination_service} as given.
        """
        mesh = parse("--service-host", "ratings.prod.svc.cluster.local")["config"].mesh
        self.assertEqual(mesh.service, "ratings.prod.svc.cluster.local")
