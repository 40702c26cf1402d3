"""Routing rules (#11): the matching of conditions, the order of routes, `continue`, and the words of a failure."""

import pytest

from relaypacsd.routing import (BadCondition, Route, condition, decide, glob_regex, inactive, keywords, start_report,
                                unmatched_reason)


def route(name, to, go_on=False, **match):
    return Route(name, tuple(to), tuple(condition(k, v) for k, v in match.items()), go_on)


ROUTES = [
    route("research", ["research"], go_on=True, path="glob:research/**"),
    route("mammo", ["breast-pacs"], Modality=["MG", "DBT"]),
    route("brains", ["orthanc", "research"], Modality="MR", StudyDescription="re:(?i)brain"),
    route("default", ["orthanc"]),
]


def test_the_first_matching_route_decides():
    d = decide(ROUTES, {"Modality": ("MG",)}, "/srv/mg", "left.dcm")
    assert (d.routes, d.destinations, d.name) == (("mammo",), ("breast-pacs",), "mammo")
    assert [(t.route, t.matched) for t in d.tried] == [("research", False), ("mammo", True)]  # default not tried


def test_continue_adds_its_destinations_and_goes_on():
    d = decide(ROUTES, {"Modality": ("MR",), "StudyDescription": ("Brain w/o",)}, "/srv/x", "research/s1/a.dcm")
    assert d.routes == ("research", "brains") and d.destinations == ("research", "orthanc")  # each once, in order
    assert d.name == "research,brains"


def test_a_route_without_match_takes_every_file_and_unmatched_says_why():
    assert decide(ROUTES, {"Modality": ("CT",)}, "/srv/ct", "a.dcm").routes == ("default",)
    d = decide(ROUTES[:3], {"Modality": ("CT",)}, "/srv/ct", "a.dcm")
    assert not d.matched and d.destinations == ()
    assert unmatched_reason(d) == ('no route matches this file (research: path "a.dcm" does not match '
                                   'glob:research/**; mammo: Modality is "CT", not one of "MG", "DBT"; '
                                   'brains: Modality is "CT", not "MR")')


def test_every_key_must_hold():
    brains = ROUTES[2]
    assert brains.first_failure({"Modality": ("MR",), "StudyDescription": ("Knee",)}, "", "a") == \
        'StudyDescription "Knee" does not match re:(?i)brain'
    assert brains.first_failure({"Modality": ("MR",), "StudyDescription": ("BRAIN",)}, "", "a") == ""


@pytest.mark.parametrize("written, value, holds", [
    ("MR", "MR", True), ("MR", "mr", False),  # exact, case as in DICOM
    (["MG", "DBT"], "DBT", True), (["MG", "DBT"], "CT", False),
    ("re:^Gehirn für", "Gehirn für Kinder", True), ("re:brain", "Brain", False), ("re:(?i)brain", "a BRAIN b", True),
    ("glob:CT*", "CT-7", True), ("glob:CT*", "XCT", False),
    (["re:^ST", "glob:*-7", "X"], "CT-7", True),  # a list of kinds: any of them
    ("脳 MRT", "脳 MRT", True),
])
def test_values_exact_lists_regexes_and_globs(written, value, holds):
    assert condition("StationName", written).holds((value,)) is holds


def test_a_missing_attribute_never_matches_even_a_pattern_that_matches_nothing():
    cond = condition("BodyPartExamined", "re:.*")
    assert cond.holds(("",)) and not cond.holds(None)
    assert cond.failure(None) == "BodyPartExamined is missing"


def test_a_multi_valued_attribute_matches_by_any_value_or_all_of_them_joined():
    cond = condition("ImageType", "LOCALIZER")
    assert cond.holds(("ORIGINAL", "PRIMARY", "LOCALIZER")) and not cond.holds(("ORIGINAL", "PRIMARY"))
    assert condition("ImageType", "re:^ORIGINAL\\\\PRIMARY").holds(("ORIGINAL", "PRIMARY", "AXIAL"))


@pytest.mark.parametrize("pattern, path, holds", [
    ("research/**", "research/a.dcm", True), ("research/**", "research/s1/s2/a.dcm", True),
    ("research/**", "researchers/a.dcm", False), ("research/*", "research/s1/a.dcm", False),
    ("**/*.dcm", "a.dcm", True), ("**/*.dcm", "x/y/a.dcm", True), ("*.dcm", "x/a.dcm", False),
    ("ct/IM?", "ct/IM1", True), ("ct/IM[0-4]", "ct/IM5", False), ("ct/IM[!0-4]", "ct/IM5", True),
    ("a+b(1)", "a+b(1)", True),  # regex characters are plain characters in a glob
])
def test_globs_are_shell_patterns_where_only_double_star_crosses_folders(pattern, path, holds):
    assert bool(glob_regex(pattern).fullmatch(path)) is holds


def test_watch_and_path_are_keys_too():
    r = route("mg-room", ["breast-pacs"], watch="/srv/relaypacs/mammo", path="glob:**/*.dcm")
    assert decide([r], {}, "/srv/relaypacs/mammo", "s1/a.dcm").matched
    assert decide([r], {}, "/srv/relaypacs/ct", "s1/a.dcm").tried[0].failed == \
        'watch is "/srv/relaypacs/ct", not "/srv/relaypacs/mammo"'
    assert decide([r], {}, "", "a.dcm").tried[0].failed == "watch is unknown (not in a watch root)"


def test_a_persons_name_is_never_shown_in_a_failure():
    cond = condition("PatientName", "re:^DOE")
    assert cond.private and cond.failure(("Müller^Jürgen",)) == "PatientName does not match re:^DOE"
    assert "Müller" not in cond.failure(("Müller^Jürgen",))


def test_a_long_value_is_cut_in_a_failure():
    failure = condition("StudyDescription", "x").failure(("y" * 500,))
    assert len(failure) < 120 and failure.endswith('...", not "x"')


def test_keywords_are_what_the_walk_must_read():
    assert keywords(ROUTES) == ("Modality", "StudyDescription")
    assert keywords([]) == ()


@pytest.mark.parametrize("key, value, words", [
    ("Modalty", "MR", "'Modalty' is not a DICOM keyword: did you mean 'Modality'?"),
    ("PixelData", "x", "binary data or a sequence (VR OB)"),
    ("ReferencedSeriesSequence", "x", "(VR SQ)"),
    ("Modality", [], "a non-empty list of strings"),
    ("Modality", 3, "use a string"),
    ("StudyDescription", "re:(brain", "not a valid regular expression"),
])
def test_a_bad_condition_says_the_fix(key, value, words):
    with pytest.raises(BadCondition, match=words.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        condition(key, value)


def test_the_start_says_the_routes_and_which_of_their_pacs_are_not_active():
    assert inactive(ROUTES, ["orthanc"]) == {"research": ("research",), "mammo": ("breast-pacs",),
                                             "brains": ("research",)}
    lines = start_report(ROUTES, ["orthanc", "research"])
    assert lines[0][0] == "INFO" and "research -> research (continue); mammo -> breast-pacs" in lines[0][1]
    assert lines[1] == ("WARNING", "route mammo: breast-pacs not active (ACTIVE_PACS / delivery.active_pacs): "
                                   "skipped (files only it routes go to failed/, stage routing)")
    assert start_report([], ["orthanc"]) == []
