# -*- test-case-name: tests.test_packaging -*-
"""
The C{twistd sidecar} plugin: it only names the module that builds the service.
"""

from twisted.application.service import ServiceMaker

sidecar = ServiceMaker(
    "sidecar",
    "sidecar.tap",
    "A service-mesh sidecar proxy: times and sizes every request to the loopback service.",
    "sidecar",
)
