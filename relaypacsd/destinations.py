"""Build the sender for each active PACS: DICOMweb STOW-RS, with C-STORE where configured as the fallback."""

from __future__ import annotations

from relaypacsd.config import PacsConfig
from relaypacsd.delivery import Sender
from relaypacsd.dicomweb import DicomWebClient, StowPart
from relaypacsd.outcomes import InstanceResult


class DicomWebSender:
    """A destination reached over DICOMweb: STOW-RS to store, the PACS's health URL to probe."""

    def __init__(self, pacs: PacsConfig, pool_size: int = 4):
        self.name = pacs.name
        self.client = DicomWebClient(pacs, pool_size=pool_size)
        self.target = self.client.base

    def send(self, parts: list[StowPart]) -> tuple[list[InstanceResult], int | None]:
        """STOW-RS the parts; one result per part, from the PACS's answer instance by instance."""
        response = self.client.store(parts)
        return response.results, response.http_status

    def probe(self) -> None:
        """Raise PacsError unless the PACS answers with our credentials."""
        self.client.probe()


def build_sender(pacs: PacsConfig, pool_size: int = 4) -> Sender:
    """The sender for one PACS."""
    return DicomWebSender(pacs, pool_size=pool_size)
