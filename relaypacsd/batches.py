"""One batch's delivery to one PACS, shared by the daemon and `relaypacsd send`: one request made safe, quick
retries, whole-batch failures split in halves; the backoff and the words that describe an answer."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Callable

from relaypacsd.errors import DestinationProblem, JournalError, PacsError, PacsUnreachable, RelayPacsError
from relaypacsd.models import Part, Sender
from relaypacsd.outcomes import InstanceResult, Outcome, results_for_error


@dataclass  # not frozen, as InstanceResult
class Changed(InstanceResult):
    """Not sent: the file is no longer the one validated (its size differs), or it is gone. Sending it again
    cannot help: it is validated again (a new version), or forgotten."""

    gone: bool = False


def backoff(base: float, attempts: int, cap: float) -> float:
    """Delay before the next delivery: base doubled per attempt, capped, with +-20 % jitter."""
    delay = min(cap, base * (2 ** max(0, attempts)))
    return delay * random.uniform(0.8, 1.2)


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


def hex_code(code: int | None) -> str | None:
    """A DICOM status or reason code as the journal and sidecars show it (0xC000)."""
    return None if code is None else f"0x{code:04X}"


def describe(result: InstanceResult) -> str:
    """One instance's answer in the words the journal keeps: outcome, code, HTTP status, reason."""
    code = f" [{hex_code(result.reason_code)}]" if result.reason_code is not None else ""
    http = f" (HTTP {result.http_status})" if result.http_status is not None else ""
    return f"{result.outcome.value}{code}{http}: {result.reason}"


def send_safely(sender: Sender, parts: list[Part]) -> tuple[list[InstanceResult], int | None, str | None]:
    """One request: results per part, HTTP status, and the reason the destination is down (or None)."""
    uids = [p.sop_uid for p in parts]
    try:
        results, status = sender.send(parts)
    except DestinationProblem as exc:
        return results_for_error(uids, Outcome.DESTINATION, str(exc), exc.status), exc.status, str(exc)
    except PacsUnreachable as exc:
        return results_for_error(uids, Outcome.TRANSIENT, str(exc)), None, str(exc)
    except PacsError as exc:
        outcome = Outcome.TRANSIENT if exc.transient else Outcome.PERMANENT
        return results_for_error(uids, outcome, str(exc), exc.status), exc.status, None
    except JournalError:  # the journal, not the file (the UID check reads it): the caller pauses and reports it
        raise
    except (OSError, RelayPacsError) as exc:  # the file vanished, changed or became unreadable under us
        return _file_trouble(parts, exc), None, None
    problem = next((r for r in results if r.outcome is Outcome.DESTINATION), None)
    return results, status, (problem.reason if problem else None)


def _file_trouble(parts: list[Part], exc: Exception) -> list[InstanceResult]:
    """A file of the request could not be read: those changed or gone since validation are Changed (one stat
    each, only on this error path); the others were not sent and wait as transient."""
    out: list[InstanceResult | None] = []
    for part in parts:
        try:
            size: int | None = os.stat(part.path).st_size
        except FileNotFoundError:
            size = None
        except OSError:
            size = part.size  # unreadable, not changed: waiting may help (permissions fixed)
        if size is None:
            out.append(Changed(part.sop_uid, Outcome.TRANSIENT, None, None, "file gone", gone=True))
        elif size != part.size:
            out.append(Changed(part.sop_uid, Outcome.TRANSIENT, None, None,
                               f"size changed from {part.size} to {size} bytes"))
        else:
            out.append(None)
    changed = [p.path.name for p, r in zip(parts, out) if r is not None]
    why = (f"not sent: {', '.join(changed)} in the same request changed since validation; sent again without it"
           if changed else f"cannot read file: {exc}")
    return [r or InstanceResult(p.sop_uid, Outcome.TRANSIENT, None, None, why) for p, r in zip(parts, out)]


AttemptHook = Callable[[list[Part], list[InstanceResult], "int | None", float, int, "str | None"], None]


def deliver_parts(sender: Sender, parts: list[Part], attempts: int, delay: float,
                  sleep: Callable[[float], object] = time.sleep,
                  on_results: Callable[[list[Part], list[InstanceResult]], None] | None = None,
                  *, on_attempt: AttemptHook | None = None, may_retry: Callable[[], bool] = lambda: True,
                  ) -> dict[Part, InstanceResult]:
    """Deliver one batch: quick retries for transient/limited outcomes (delay doubling), whole-batch failures
    split in halves down to one file; a destination problem stops the retries. The daemon and `send` share it.

    `sleep` returning True means "stop now": what still waits is settled as transient. `on_attempt` sees every
    request (parts, results, HTTP status, ms, attempt, down-reason); `on_results` every settled group.
    """
    final: dict[Part, InstanceResult] = {}
    todo, attempt = list(parts), 0
    while todo:
        attempt += 1
        started = time.monotonic()
        results, status, down = send_safely(sender, todo)
        if on_attempt:
            on_attempt(todo, results, status, _ms(started), attempt, down)
        retry: list[Part] = []
        split: list[Part] = []
        settled: list[tuple[Part, InstanceResult]] = []
        go_on = may_retry()  # stopping, or the PACS is down: no further request for this batch
        for part, result in zip(todo, results):
            if result.outcome is Outcome.SPLIT and go_on:
                split.append(part)
            elif result.outcome is Outcome.SPLIT:
                settled.append((part, InstanceResult(part.sop_uid, Outcome.TRANSIENT, result.http_status,
                                                     result.reason_code, f"{result.reason} (not split now: "
                                                     "stopping, or the PACS is down)")))
            elif (result.outcome in (Outcome.TRANSIENT, Outcome.LIMITED) and attempt < attempts and down is None
                  and go_on and not isinstance(result, Changed)):
                retry.append(part)
            else:
                settled.append((part, result))
        if retry and sleep(delay * (2 ** (attempt - 1))):
            # stopping: what would have been retried waits for the next start
            settled += [(p, InstanceResult(p.sop_uid, Outcome.TRANSIENT, None, None, "daemon stopping")) for p in retry]
            retry = []
        final.update(settled)
        if on_results and settled:
            on_results([p for p, _ in settled], [r for _, r in settled])
        if split:
            # Blame no single file for a whole-batch failure: resend in halves down to one file.
            half = max(1, len(split) // 2)
            for chunk in (split[:half], split[half:]):
                if chunk:
                    final.update(deliver_parts(sender, chunk, attempts, delay, sleep, on_results,
                                               on_attempt=on_attempt, may_retry=may_retry))
        todo = retry
    return final
