"""`off_policy`, `tis_cap`, `ratio_cap` are policy settings the checker resolves and
validates (E022, located); `max_staleness` with a correction or without one checks
(E034's programs are in tests/bad_programs)."""

from __future__ import annotations

from test_language_engines import errors, program

from rlhfc.frontend.check import check_program

TINY = 'llama(preset = "tiny")'


def _train_settings(path) -> dict:
    flow, diagnostics = check_program(path)
    assert flow is not None, diagnostics
    return dict(next(c for c in flow.calls if c.kind.value == "train").settings)


def test_corrections_resolve_synchronous_or_not(tmp_path):
    """A correction at max_staleness = 0 is allowed: an engine's numerics differ from the
    trainer's too. With K >= 1 and no correction the ratio's old policy is the stale one."""
    for extra in ('off_policy = "decoupled"  ratio_cap = 5.0', 'off_policy = "tis"  tis_cap = 3.0  max_staleness = 1',
                  "max_staleness = 2"):
        path = program(tmp_path, TINY, extra)
        assert errors(path) == [], extra
    assert _train_settings(program(tmp_path, TINY))["off_policy"] == "none"
    settings = _train_settings(program(tmp_path, TINY, 'off_policy = "tis"  tis_cap = 3.0'))
    assert (settings["off_policy"], settings["tis_cap"], settings["ratio_cap"]) == ("tis", 3.0, 0.0)


def test_bad_values_are_located_e022(tmp_path):
    for extra, needle in (('off_policy = "is"', "`off_policy` must be one of"), ("tis_cap = 0.5", "`tis_cap` must lie"),
                          ('off_policy = "tis"  ratio_cap = 1.0', "must exceed 1"),
                          ("ratio_cap = 4.0", 'needs off_policy = "decoupled" or "tis"')):
        path = program(tmp_path, TINY, extra)
        found = errors(path)
        assert [d.code for d in found] == ["E022"] and needle in found[0].message, (extra, found)
        line = path.read_text().splitlines()[found[0].span.line - 1]
        assert line[found[0].span.col - 1:].startswith(extra.split("= ")[-1]), (extra, found[0].span)
