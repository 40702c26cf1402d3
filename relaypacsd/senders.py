"""Build the sender for each active PACS: DICOMweb STOW-RS, with C-STORE where configured as the fallback."""

from __future__ import annotations

import threading

from loguru import logger

from relaypacsd.config import PacsConfig
from relaypacsd.dicomweb import DicomWebClient
from relaypacsd.errors import DestinationProblem, PacsError, PacsUnreachable
from relaypacsd.http import log_security_warnings, make_auth, make_session, tls_settings
from relaypacsd.models import Part, Sender
from relaypacsd.outcomes import InstanceResult


class DicomWebSender:
    """A destination reached over DICOMweb: STOW-RS to store, the PACS's health URL to probe.

    Each worker thread gets a client (and requests.Session) of its own: Sessions are not thread-safe
    (requests #2766). They share one auth object, so an OAuth2 token is fetched once for all of them.
    """

    def __init__(self, pacs: PacsConfig):
        self.name = pacs.name
        self.pacs = pacs
        self.target = pacs.stow_base
        self._auth = make_auth(pacs, *tls_settings(pacs))
        log_security_warnings(pacs)  # once for all the worker threads' sessions
        self._local = threading.local()

    @property
    def client(self) -> DicomWebClient:
        """This thread's client."""
        client = getattr(self._local, "client", None)
        if client is None:
            # one connection per thread: a worker sends one request at a time
            session = make_session(self.pacs, pool_size=1, auth=self._auth)
            client = self._local.client = DicomWebClient(self.pacs, session=session)
        return client

    def send(self, parts: list[Part]) -> tuple[list[InstanceResult], int | None]:
        """STOW-RS the parts; one result per part, from the PACS's answer instance by instance."""
        response = self.client.store(parts)
        return response.results, response.http_status

    def probe(self) -> None:
        """Raise PacsError unless the PACS answers with our credentials."""
        self.client.probe()


# STOW endpoint answers that mean "this endpoint is unusable", never "this file is bad".
FALLBACK_STATUSES = frozenset({404, 405, 415})


def stow_unusable(exc: PacsError) -> bool:
    """True when a STOW error says the endpoint itself is unusable (no answer, or no STOW-RS there)."""
    if isinstance(exc, PacsUnreachable):
        # Only when no connection was ever made: a request that may have reached the PACS (a read timeout,
        # a connection cut during the upload or the answer) may have stored the files, which C-STORE would
        # then send a second time.
        return not exc.sent
    return isinstance(exc, DestinationProblem) and exc.status in FALLBACK_STATUSES


class FallbackSender:
    """STOW-RS first; C-STORE for a batch only when the STOW endpoint itself is unusable.

    Per-instance rejections (a STOW answer, whatever it says) never trigger the fallback: the
    PACS has spoken about those files. Credentials problems (401/403) neither: C-STORE would
    hide a setup error the operator must fix."""

    def __init__(self, pacs: PacsConfig):
        from relaypacsd.cstore import CStoreSender

        self.name = pacs.name
        self.stow = DicomWebSender(pacs)
        self.cstore = CStoreSender(pacs)
        self.target = f"{self.stow.target} (fallback {self.cstore.target})"
        self.last_path = ""

    def send(self, parts: list[Part]) -> tuple[list[InstanceResult], int | None]:
        """STOW-RS the batch; on an unusable endpoint, C-STORE the same batch."""
        try:
            results, status = self.stow.send(parts)
        except PacsError as exc:
            if not stow_unusable(exc):
                raise
            logger.warning("PACS forward {}: STOW-RS unusable ({}); sending {} file(s) via C-STORE to {}",
                           self.name, exc, len(parts), self.cstore.target)
            try:
                results, status = self.cstore.send(parts)
            except PacsError as cexc:
                raise type(cexc)(f"{cexc} (STOW-RS also failed: {exc})", **_kw(cexc)) from None
            self._used("C-STORE")
            return results, status
        self._used("STOW-RS")
        return results, status

    def _used(self, path: str) -> None:
        if path != self.last_path:
            logger.info("PACS forward {}: delivering via {}", self.name, path)
            self.last_path = path

    def probe(self) -> None:
        """Healthy when either path works: STOW-RS probe, then C-ECHO; raise only if both fail."""
        try:
            self.stow.probe()
            stow_error = None
        except PacsError as exc:
            if not stow_unusable(exc):
                raise
            stow_error = exc
        try:
            self.cstore.probe()
        except PacsError as exc:
            if stow_error is not None:
                raise type(exc)(f"{exc} (and STOW-RS: {stow_error})", **_kw(exc)) from None
            logger.warning("PACS {}: STOW-RS fine but the C-STORE fallback fails C-ECHO: {}", self.name, exc)


def _kw(exc: PacsError) -> dict:
    """The constructor arguments that rebuild `exc` with a longer message (each class takes its own)."""
    if isinstance(exc, DestinationProblem):
        return {"status": exc.status}
    if isinstance(exc, PacsUnreachable):
        return {"sent": exc.sent}
    return {"transient": exc.transient, "status": exc.status}


def build_sender(pacs: PacsConfig) -> Sender:
    """The sender for one PACS: STOW-RS, with the C-STORE fallback when `fallback = "cstore"`."""
    if pacs.fallback == "cstore":
        return FallbackSender(pacs)
    return DicomWebSender(pacs)
