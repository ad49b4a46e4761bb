# -*- test-case-name: tests -*-
"""
sidecar: a service-mesh sidecar proxy on Twisted.

See C{README.md} for the architecture: two front doors (L{sidecar.downstream} and
L{sidecar.resource}) feeding one engine (L{sidecar.exchange}, L{sidecar.upstream}) whose
records go to the L{sidecar.stats.Recorder}.
"""

__version__ = "0.1.0"
