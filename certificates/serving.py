"""This gateway process's HTTPS listener, whose certificate is swapped in place: applying one restarts nothing.

daphne opens the listeners it is given once, at start. This process opens its HTTPS listener itself, on
OPTIMAGPT_HTTPS_PORT beside daphne's HTTP one, with daphne's own HTTP factory (so requests and node links
over it are the same as over HTTP, with scheme https/wss), and with a TLS connection creator that Twisted
asks for each new connection. Applying a certificate replaces the OpenSSL context that creator hands
out: the next handshake gets the new certificate, connections already open keep the one they began with
(a stream in flight finishes, a node's link stays up), and nothing restarts. Removing the certificate
closes the listener (open connections end when their clients leave); the first certificate opens it.

Everything here runs on the reactor's event loop; `apply_threadsafe` is the door for a view's thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle import Bundle, CertificateRefused, Summary, bundle_from_files

log = logging.getLogger("optimagpt.certificates")


def _context(bundle: Bundle) -> Any:
    """An OpenSSL server context for `bundle` with Twisted's defaults (TLS 1.2 at least, its cipher list)."""
    from OpenSSL import crypto
    from twisted.internet.ssl import CertificateOptions, TLSVersion

    options = CertificateOptions(privateKey=crypto.PKey.from_cryptography_key(bundle.key),
                                 certificate=crypto.X509.from_cryptography(bundle.leaf),
                                 extraCertChain=[crypto.X509.from_cryptography(c) for c in bundle.chain],
                                 raiseMinimumTo=TLSVersion.TLSv1_2)
    return options.getContext()


class LiveCertificate:
    """Twisted's IOpenSSLServerConnectionCreator: each new TLS connection gets the context in force now."""

    def __init__(self) -> None:
        self.context: Any = None

    def serverConnectionForTLS(self, tls_protocol: Any) -> Any:  # noqa: N802 - Twisted's interface names it
        from OpenSSL import SSL

        return SSL.Connection(self.context, None)


def _declare_interface() -> None:
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
    from zope.interface import classImplements

    classImplements(LiveCertificate, IOpenSSLServerConnectionCreator)


@dataclass
class Listening:
    host: str
    port: int


class HttpsSide:
    """The HTTPS listener of this process: its state for the page, its certificate, its port."""

    def __init__(self) -> None:
        self.creator = LiveCertificate()
        self.summary: Summary | None = None  # what new connections get now
        self.state = "HTTP only: no certificate"
        self.listening: Listening | None = None
        self._port: Any = None
        self._factory: Any = None
        self._interface = "127.0.0.1"
        self._port_number = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._files: tuple[Path, Path] | None = None
        self._files_mtimes: tuple[float, float] = (0.0, 0.0)
        self._files_summary: Summary | None = None
        self._pending: Bundle | None = None

    # -- set-up, once, by optimagpt/server.py ------------------------------------------------------
    def configure(self, *, interface: str, port: int, files: tuple[Path, Path] | None) -> None:
        self._interface, self._port_number, self._files = interface, port, files

    def files_summary(self) -> Summary | None:
        return self._files_summary

    def load_at_start(self, stored: Bundle | None) -> None:
        """The certificate to serve from the start (sync, before the reactor runs): the files', else `stored`."""
        bundle = stored
        if self._files is not None:
            bundle = self._read_files()
        self._pending = bundle
        if bundle is None and self._files is None:
            self.state = "HTTP only: no certificate"

    def attach(self, factory: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Once the reactor runs: daphne's HTTP factory to serve HTTPS with; open the listener if there is one."""
        _declare_interface()
        self._factory, self._loop = factory, loop
        bundle, self._pending = self._pending, None
        if bundle is not None:
            self.apply(bundle, source="files" if self._files else "stored")

    # -- applying ------------------------------------------------------------------------------------
    def apply_threadsafe(self, bundle: Bundle | None, *, source: str) -> None:
        """From any thread: apply on the event loop (nothing, in a process that does not serve)."""
        if self._loop is None or self._loop.is_closed():
            return  # tests in-process, or a management command: no listener here
        # An empty context: the caller's (a view's thread, inside asgiref's executor for that request) ends with it.
        self._loop.call_soon_threadsafe(self.apply, bundle, source, context=contextvars.Context())

    def apply(self, bundle: Bundle | None, source: str = "stored") -> None:
        """Serve `bundle` to new connections from now on; None closes the listener (HTTP only)."""
        if self._factory is None:
            self._pending = bundle
            return
        if self._files is not None and source != "files":
            return  # the deployment's files win over anything stored
        if bundle is None:
            self.summary = None
            self._close("HTTP only: no certificate")
            return
        try:
            self.creator.context = _context(bundle)
        except Exception as exc:  # noqa: BLE001 - pyOpenSSL refused it: keep serving what was served
            log.error("the certificate could not be put in service: %s", exc)
            return
        self.summary = bundle.summary()
        log.info("HTTPS serves %s (SHA-256 %s) to new connections", self.summary.subject, self.summary.fingerprint)
        if self._port is None and self._port_number:
            self._open()

    def _open(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.endpoints import SSL4ServerEndpoint

        self.state = f"HTTPS starting on port {self._port_number}"
        self._port = "opening"  # not None: a second apply meanwhile does not open a second listener
        listening = SSL4ServerEndpoint(reactor, self._port_number, self.creator, interface=self._interface)

        def opened(port: Any) -> None:
            if self.summary is None:  # removed while the port was opening
                self._port = None
                port.stopListening()
                return
            self._port = port
            address = port.getHost()
            self.listening = Listening(host=address.host, port=address.port)
            self.state = f"HTTPS on port {address.port}"
            log.info("HTTPS listening on %s:%d", address.host, address.port)

        def failed(failure: Any) -> None:
            self._port, self.listening = None, None
            self.state = f"HTTPS could not listen on port {self._port_number}: {failure.getErrorMessage()}"
            log.error("%s", self.state)

        # The port's reader, and so every connection it accepts, keeps the context it is made in (asyncio's
        # add_reader): a fresh one, never that of whoever applied the certificate, such as a page view whose
        # asgiref executor has ended (its connections' database calls then failed: "CurrentThreadExecutor
        # already quit").
        contextvars.Context().run(lambda: listening.listen(self._factory).addCallbacks(opened, failed))

    def _close(self, state: str) -> None:
        port, self._port, self.listening = self._port, None, None
        self.state = state
        if port is not None and port != "opening":
            port.stopListening()
            log.info("HTTPS listener closed: %s", state)

    # -- files managed by the deployment (--tls-cert, --tls-key) -------------------------------------
    def _read_files(self) -> Bundle | None:
        assert self._files is not None
        cert, key = self._files
        try:
            self._files_mtimes = (cert.stat().st_mtime, key.stat().st_mtime)
            bundle = bundle_from_files(cert, key)
        except (OSError, CertificateRefused) as exc:
            self.state = f"HTTPS off: {cert} could not be used: {exc}"
            log.error("%s", self.state)
            return None
        self._files_summary = bundle.summary()
        return bundle

    async def watch_forever(self, stop: asyncio.Event) -> None:
        """Until `stop` is set, every OPTIMAGPT_TLS_CHECK_S: the files read again when they change (a renewal by
        certbot, say); else the stored certificate read again when its fingerprint is not the one served (one
        saved by `manage.py certificate`, or by another process whose broadcast did not arrive)."""
        from django.conf import settings

        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), settings.OPTIMAGPT_TLS_CHECK_S)
                return
            except TimeoutError:
                pass
            try:
                if self._files is not None:
                    await self._check_files()
                else:
                    await self._check_stored()
            except Exception as exc:  # noqa: BLE001 - the database away for a moment: look again next time
                log.warning("could not check the certificate: %s", type(exc).__name__)

    async def _check_files(self) -> None:
        assert self._files is not None
        cert, key = self._files
        try:
            mtimes = await asyncio.to_thread(lambda: (cert.stat().st_mtime, key.stat().st_mtime))
        except OSError:
            return  # mid-replacement: look again next time
        if mtimes != self._files_mtimes:
            bundle = await asyncio.to_thread(self._read_files)
            if bundle is not None:
                self.apply(bundle, source="files")

    async def _check_stored(self) -> None:
        from channels.db import database_sync_to_async

        from .store import stored_bundle, stored_fingerprint

        served = self.summary.fingerprint if self.summary is not None else None
        if await database_sync_to_async(stored_fingerprint)() != served:
            self.apply(await database_sync_to_async(stored_bundle)(), source="stored")


side = HttpsSide()
