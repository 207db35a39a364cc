"""tests/mutation_scores.py: the per-module mutation score that `make mutate` prints (tests/README.md, "Mutation
testing"), on hand-made mutmut result files."""

from __future__ import annotations

import json

from tests import mutation_scores


def _meta(folder, module: str, codes: dict) -> None:
    path = folder / f"{module}.meta"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"exit_code_by_key": codes, "durations_by_key": {}}))


def test_score_is_killed_over_killed_and_survived_with_timeouts_killed_and_equivalents_apart(tmp_path):
    mutants = tmp_path / "mutants"
    name = "components.registry.gate.x_evaluate_gate__mutmut_{}".format
    _meta(
        mutants,
        "components/registry/gate.py",
        {
            name(1): 1,  # killed
            name(2): 1,
            name(3): 3,  # pytest's internal error: killed
            name(4): 36,  # timeout: killed
            name(5): 0,  # survived
            name(6): 0,  # survived, explained as equivalent
            name(7): 33,  # no test reaches it
            name(8): None,  # not run yet
        },
    )
    _meta(mutants, "components/intake/ledger.py", {"components.intake.ledger.x_now__mutmut_1": 33})
    _meta(mutants, "components/methods/finetune.py", {})  # nothing to mutate: no row

    rows, survivors = mutation_scores.module_rows(mutants, {name(6)})

    assert [r.module for r in rows] == ["components/intake/ledger.py", "components/registry/gate.py"]
    ledger, gate = rows
    assert (gate.killed, gate.timeout, gate.survived, gate.equivalent, gate.no_tests, gate.other) == (3, 1, 1, 1, 1, 1)
    assert gate.total == 8
    assert gate.score == 4 / 5
    assert survivors == [name(5)]
    assert ledger.score is None  # nothing reached: no score rather than 0% or 100%
    table = mutation_scores.table(rows)
    assert "| components/registry/gate.py | 8 | 4 | 1 | 1 | 1 | 1 | 1 | 80.0% |" in table
    assert "| components/intake/ledger.py | 1 | 0 | 0 | 0 | 0 | 1 | 0 | - |" in table


def test_equivalents_are_the_backquoted_mutant_names_of_the_note(tmp_path):
    note = tmp_path / "equivalents.txt"
    note.write_text(
        "| mutant | why |\n|---|---|\n"
        "| `components.model.pools.x_kmeans_l1__mutmut_3` | same centroids |\n"
        "- `components.registry.gate.xǁVerdictǁmarkdown__mutmut_12`: same page\n"
        "`components.registry.gate` alone is not a mutant\n"
    )
    assert mutation_scores.equivalent_names(note) == {
        "components.model.pools.x_kmeans_l1__mutmut_3",
        "components.registry.gate.xǁVerdictǁmarkdown__mutmut_12",
    }
    assert mutation_scores.equivalent_names(tmp_path / "absent.txt") == set()


def test_no_results_is_one_line_not_a_traceback(tmp_path, capsys):
    assert mutation_scores.main([str(tmp_path / "mutants")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make mutate" in err
