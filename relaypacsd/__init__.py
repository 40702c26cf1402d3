"""relaypacsd: the forwarding daemon of the RelayPACS Gateway."""

__version__ = "0.1.0"
