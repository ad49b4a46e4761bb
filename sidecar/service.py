# -*- test-case-name: tests.test_service -*-
"""
Assembly: builds the recorder, the pool, the engine and the listeners from a
L{ProxyConfig}.  It decides nothing; every policy lives in the modules it wires.
"""

from __future__ import annotations

import io
import os
import sys
from typing import IO, Any, Optional

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from sidecar.accesslog import FORMATS, AccessLog
from sidecar.config import ProxyConfig
from sidecar.exchange import Engine
from sidecar.stats import Recorder
from sidecar.upstream import UpstreamPool

log = Logger()


def openAccessLog(path: Optional[str]) -> Optional[IO[str]]:
    """
    The stream the access log writes to: a duplicate of file descriptor 1 for C{"-"}
    (twistd later replaces C{sys.stdout} with its own logger), a file opened for
    appending otherwise.
    """
    if path is None:
        return None
    if path == "-":
        try:
            fd = os.dup(sys.stdout.fileno())
        except (AttributeError, OSError, io.UnsupportedOperation):
            return sys.stdout
        return os.fdopen(fd, "w", buffering=64 * 1024, encoding="utf-8")
    return open(path, "a", buffering=64 * 1024, encoding="utf-8")


class SidecarService(MultiService):
    """
    The whole sidecar: listeners and timers as children, the shared objects as
    attributes.
    """

    def __init__(self, config: ProxyConfig, reactor: Any) -> None:
        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.accessLog: Optional[AccessLog] = None
        sinks = []
        stream = openAccessLog(config.accessLog)
        if stream is not None:
            self.accessLog = AccessLog(stream, FORMATS[config.logFormat], reactor)
            sinks.append(self.accessLog)
        self.recorder = Recorder(sinks)
        self.pool = UpstreamPool(reactor, reactor, config.upstream)
        self.engine = Engine(
            reactor, self.pool, self.recorder,
            serverHeader=config.serverHeader.encode("ascii"),
            responseTimeout=config.upstream.responseTimeout,
        )
        TimerService(max(config.upstream.idleTimeout / 2, 0.5), self.pool.sweep).setServiceParent(self)
        self.listeners = []
        self.tls = None
        if config.tls is not None:
            from sidecar.tls import MutualTLS

            self.tls = MutualTLS.fromConfig(config.tls, reactor)
            reload = TimerService(config.tls.reloadInterval, self.tls.reload)
            reload.clock = reactor
            reload.setServiceParent(self)
        if config.listen is not None:
            plain = self.proxyFactory()
            if self.tls is not None and config.tls.permissive:
                plain = self.tls.permissiveFactory(plain, self.engine, config.maxHeaderBytes)
            self.listeners.append(self._listen(config.listen, plain))
        if self.tls is not None and config.tls.listen is not None:
            self.listeners.append(
                self._listen(config.tls.listen, self.tls.serverFactory(self.engine, config.maxHeaderBytes)))

    def proxyFactory(self) -> Any:
        """
        The factory of the configured front door.
        """
        if self.config.engine == "web":
            from sidecar.resource import proxySite

            return proxySite(self.engine)
        from sidecar.downstream import DownstreamFactory

        return DownstreamFactory(self.engine, self.config.maxHeaderBytes)

    def _listen(self, description: str, factory: Any) -> StreamServerEndpointService:
        service = StreamServerEndpointService(serverFromString(self.reactor, description), factory)
        service._raiseSynchronously = True
        service.setServiceParent(self)
        return service

    def startService(self) -> None:
        MultiService.startService(self)
        log.info("sidecar proxying {listen} to {upstream} ({engine} front door)",
                 listen=self.config.listen, upstream=self.pool.address, engine=self.config.engine)

    def stopService(self):
        d = MultiService.stopService(self)
        self.pool.closeAll()
        if self.accessLog is not None:
            self.accessLog.flush()
        return d


def makeService(config: ProxyConfig, reactor: Any) -> SidecarService:
    """
    Build the sidecar for C{config} on C{reactor}.
    """
    return SidecarService(config, reactor)
