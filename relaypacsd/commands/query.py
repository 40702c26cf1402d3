"""`query` (QIDO-RS), `retrieve` (WADO-RS) and `verify` (is every instance at every PACS)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from relaypacsd import dicomfile, dicomjson, routing
from relaypacsd.commands.common import (EXIT_FAIL, EXIT_OK, Progress, UsageError, check_uid, expand_paths_from, load,
                                        pick_pacs, place, print_json, table)
from relaypacsd.config import PacsConfig
from relaypacsd.dicomweb import DicomWebClient
from relaypacsd.errors import DestinationProblem, InvalidDicomError

_DATE_RE = re.compile(r"^(\d{8})?-?(\d{8})?$")
_MODALITY_RE = re.compile(r"^[A-Z0-9_]{1,16}$")

# DICOM JSON tags shown by `query`.
TAGS = {
    "PatientID": "00100020", "PatientName": "00100010", "StudyDate": "00080020", "ModalitiesInStudy": "00080061",
    "AccessionNumber": "00080050", "StudyInstanceUID": "0020000D", "StudyDescription": "00081030",
    "NumberOfStudyRelatedSeries": "00201206", "NumberOfStudyRelatedInstances": "00201208",
}


def _text(ds: dict, tag: str) -> str:
    out = []
    for v in dicomjson.values(ds, tag):
        if isinstance(v, dict):  # PN
            v = v.get("Alphabetic", "")
        out.append(str(v))
    return "\\".join(out)


def _client(pacs: PacsConfig) -> DicomWebClient:
    return DicomWebClient(pacs, pool_size=1)


# -- query ---------------------------------------------------------------------------------------


def query_params(args: argparse.Namespace) -> dict[str, str]:
    """QIDO-RS parameters from the command line, each checked."""
    params: dict[str, str] = {}
    if args.patient_id:
        params["PatientID"] = args.patient_id
    if args.study_date:
        m = _DATE_RE.match(args.study_date)
        if not m or not (m.group(1) or m.group(2)):
            raise UsageError(f"--study-date {args.study_date!r}: use YYYYMMDD or a range YYYYMMDD-YYYYMMDD "
                             "(either end may be left open)")
        params["StudyDate"] = args.study_date
    if args.modality:
        mod = args.modality.upper()
        if not _MODALITY_RE.match(mod):
            raise UsageError(f"--modality {args.modality!r}: use a DICOM modality code such as CT, MR, US, DX")
        params["ModalitiesInStudy"] = mod
    if args.accession:
        params["AccessionNumber"] = args.accession
    if args.study_uid:
        params["StudyInstanceUID"] = check_uid(args.study_uid, "--study-uid")
    if args.limit is not None:
        if args.limit < 1:
            raise UsageError("--limit must be 1 or more")
        params["limit"] = str(args.limit)
    params["includefield"] = ",".join(TAGS[k] for k in ("ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                                                         "NumberOfStudyRelatedInstances", "StudyDescription"))
    return params


def cmd_query(args: argparse.Namespace) -> int:
    """QIDO-RS study search; a table (patient names only with --show-names) or JSON."""
    config = load(args)
    params = query_params(args)
    pacs = pick_pacs(config, args.to)
    found = _client(pacs).search("studies", params)
    rows = []
    for ds in found:
        row = {
            "PatientID": _text(ds, TAGS["PatientID"]),
            "StudyDate": _text(ds, TAGS["StudyDate"]),
            "Modalities": _text(ds, TAGS["ModalitiesInStudy"]).replace("\\", ","),
            "Accession": _text(ds, TAGS["AccessionNumber"]),
            "StudyUID": _text(ds, TAGS["StudyInstanceUID"]),
            "Series": _text(ds, TAGS["NumberOfStudyRelatedSeries"]),
            "Instances": _text(ds, TAGS["NumberOfStudyRelatedInstances"]),
        }
        if args.show_names:
            row = {"PatientName": _text(ds, TAGS["PatientName"]), **row}
        rows.append(row)
    rows.sort(key=lambda r: (r["StudyDate"], r["PatientID"], r["StudyUID"]))
    if args.json:
        print_json(rows)
        return EXIT_OK
    if not rows:
        print(f"no study found at {pacs.name} ({pacs.stow_base}) for {_describe(params)}")
        return EXIT_OK
    headers = list(rows[0])
    print(table(headers, [list(r.values()) for r in rows]))
    print(f"{len(rows)} stud{'y' if len(rows) == 1 else 'ies'} at {pacs.name}"
          + (" (limit reached: raise --limit)" if args.limit and len(rows) >= args.limit else ""))
    return EXIT_OK


def _describe(params: dict[str, str]) -> str:
    shown = {k: v for k, v in params.items() if k not in ("includefield", "limit")}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "any study"


# -- retrieve ------------------------------------------------------------------------------------


def cmd_retrieve(args: argparse.Namespace) -> int:
    """WADO-RS a study into --out, one file per instance, with a progress line on stderr."""
    config = load(args)
    uid = check_uid(args.study_uid, "study UID")
    pacs = pick_pacs(config, args.source)
    client = _client(pacs)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    total = None
    try:
        found = client.search("studies", {"StudyInstanceUID": uid, "includefield": TAGS["NumberOfStudyRelatedInstances"]})
        if found:
            n = _text(found[0], TAGS["NumberOfStudyRelatedInstances"])
            total = int(n) if n.isdigit() else None
    except Exception:  # noqa: BLE001 - the count is only for the progress bar
        total = None
    progress = Progress(f"retrieve {uid[-20:]}", total)
    started = time.monotonic()
    files = client.retrieve_study(uid, out, progress=progress.update)
    progress.done()
    size = sum(f.stat().st_size for f in files)
    print(f"retrieved {len(files)} instance(s) of study {uid} from {pacs.name} into {out} "
          f"({size / 1e6:.1f} MB in {time.monotonic() - started:.1f} s)")
    return EXIT_OK


# -- verify --------------------------------------------------------------------------------------


def _study_instances(client: DicomWebClient, study: str) -> list[dict]:
    """QIDO instances of one study; a 404 (some servers' "no such study") is an empty list."""
    try:
        return client.search("instances", {"includefield": "00080018"}, study_uid=study)
    except DestinationProblem as exc:
        if exc.status == 404:
            return []
        raise


def _instances_of(args: argparse.Namespace, config: Any) -> list[tuple[str, str, str, tuple[str, ...] | None]]:
    """(study UID, SOP UID, label, the PACS it is routed to or None for every active one) per instance."""
    targets = args.targets
    if len(targets) == 1 and not Path(targets[0]).exists() and re.match(r"^[0-9.]+$", targets[0]):
        study = check_uid(targets[0], "study UID")
        first = pick_pacs(config, args.source)
        found = _study_instances(_client(first), study)
        if not found:
            raise UsageError(f"study {study} not found at {first.name}: nothing to verify "
                             "(check the UID with `relaypacsd query --study-uid`)")
        if config.routes:  # a PACS's listing has no files to route by
            print("note: a study UID is checked at every active PACS, whatever the routes say; name the files "
                  "(verify PATH...) to check each at the PACS its route gives", file=sys.stderr)
        return sorted({(study, _text(ds, "00080018"), "-", None) for ds in found if _text(ds, "00080018")})
    out = []
    roots = [Path(w.path) for w in config.watch]
    for path, base in expand_paths_from(targets):
        try:
            info = dicomfile.inspect(path, attributes=routing.keywords(config.routes))
        except InvalidDicomError as exc:
            print(f"skip {path}: {exc}", file=sys.stderr)
            continue
        dests = None
        if config.routes:  # by the routes configured now: where the daemon sends such a file
            decision = routing.decide(config.routes, info.attrs, *place(path, base, roots))
            dests = tuple(d for d in decision.destinations if d in config.delivery.active_pacs)
            if not dests:
                print(f"no PACS for {path}: " + (routing.unmatched_reason(decision) if not decision.matched
                                                  else routing.inactive_reason(decision)), file=sys.stderr)
        out.append((info.study_instance_uid, info.sop_instance_uid, str(path), dests))
    if not out:
        raise UsageError("no DICOM instance among the paths given: nothing to verify")
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    """For each instance, check it is at every active PACS it is routed to (every one without [[route]]
    tables) with QIDO-RS; '-' where it is not routed. Exit 0 only if none is missing and every file has a PACS."""
    config = load(args)
    instances = _instances_of(args, config)
    pacs_list = config.active()
    if not pacs_list:
        raise UsageError("no active PACS to verify against: set ACTIVE_PACS / ORTHANC_URL")

    def wanted(dests: tuple[str, ...] | None, name: str) -> bool:
        return dests is None or name in dests

    present: dict[str, set[tuple[str, str]]] = {}
    for pacs in pacs_list:
        client = _client(pacs)
        have: set[tuple[str, str]] = set()
        mine = [(s, u) for s, u, _, dests in instances if wanted(dests, pacs.name)]
        for study in sorted({s for s, _ in mine}):
            found = _study_instances(client, study)
            have |= {(study, _text(ds, "00080018")) for ds in found}
        for study, sop in mine:  # a server may cap QIDO results: ask for each one not listed
            if (study, sop) not in have and client.instance_exists(study, sop):
                have.add((study, sop))
        present[pacs.name] = have
    rows, missing = [], 0
    for study, sop, label, dests in instances:
        marks = [("yes" if (study, sop) in present[p.name] else "MISSING") if wanted(dests, p.name) else "-"
                 for p in pacs_list]
        missing += marks.count("MISSING")
        rows.append([sop, label, *marks])
    homeless = sum(1 for *_, dests in instances if dests == ())
    if args.json:
        print_json([{"sop_instance_uid": r[0], "file": r[1], **dict(zip([p.name for p in pacs_list], r[2:]))}
                    for r in rows])
    else:
        print(table(["SOPInstanceUID", "file", *[p.name for p in pacs_list]], rows))
        for p in pacs_list:
            routed = [(s, u) for s, u, _, dests in instances if wanted(dests, p.name)]
            n = sum(1 for key in routed if key in present[p.name])
            there = " (those routed there)" if config.routes else ""
            print(f"{p.name}: {n}/{len(routed)} instance(s) present{there}")
    if missing or homeless:
        print(f"NOT COMPLETE: {missing} instance/PACS pair(s) missing"
              + (f", {homeless} file(s) routed to no active PACS" if homeless else ""), file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK
