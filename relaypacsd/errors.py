"""The exceptions of relaypacsd: each message says what a technician can do about it."""

from __future__ import annotations

from pathlib import Path

# The command line's exit codes (docs/commands.md), for every command: 2 is always a configuration error.
EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


class RelayPacsError(Exception):
    """Base of every error relaypacsd raises on purpose."""


class ConfigError(RelayPacsError):
    """The configuration is unusable; the message names the key and the fix."""


class SpoolError(RelayPacsError):
    """A watch root cannot be used as a spool (permissions, several filesystems, ...)."""


class AlreadyFinished(SpoolError):
    """A claimed name was a second name of a file already in sent/ or failed/ (a move stopped halfway): it went."""


class InvalidDicomError(RelayPacsError):
    """A file is not a DICOM instance this gateway can forward (a permanent, per-file problem)."""


class PacsError(RelayPacsError):
    """Talking to a PACS failed; `transient` says whether waiting may help."""

    def __init__(self, message: str, *, transient: bool = True, status: int | None = None):
        super().__init__(message)
        self.transient = transient
        self.status = status


class PacsUnreachable(PacsError):
    """The PACS did not answer, or not completely (DNS, refused connection, timeout, TLS, a cut connection).

    `sent` is true when the request may have reached it (the connection was made): it may have stored the
    files, so they must not be sent another way now; false only when no connection was ever made."""

    def __init__(self, message: str, *, sent: bool = True):
        super().__init__(message, transient=True)
        self.sent = sent


class DestinationProblem(PacsError):
    """The PACS answered, but its setup is wrong for us (401/403/404/405/415): not the file's fault."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message, transient=True, status=status)


class PartChanged(RelayPacsError):
    """A file changed size between batching and sending (still being written?): resend it later."""

    def __init__(self, path: Path, expected: int, actual: int):
        super().__init__(f"{path}: size changed from {expected} to {actual} bytes while sending: "
                         "is another program still writing it?")
        self.path = path


class RequeueError(RelayPacsError):
    """A failed file could not be moved back to sending/ (an operator's retry); it stays in failed/."""


class JournalError(RelayPacsError):
    """The journal (the delivery memory in the state directory) cannot be opened or read."""


class JournalBusy(JournalError):
    """A row the journal needs is locked by another node's transaction (a node paused mid-transaction): later."""


class LeaseLost(JournalError):
    """This node was presumed dead and another node took its files over: it must let go of them."""


class NodeConflict(RelayPacsError):
    """Another gateway serves this spool or uses this node's name; the message says which and what to do."""


class PauseError(RelayPacsError):
    """An operator's pause or resume of a PACS that cannot be done (unknown, already so, state dir not writable)."""
