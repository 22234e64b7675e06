"""tools/mutants.py: its mutants still match today's code, and one of them is caught end to end."""

import mutants


def test_every_mutant_matches_the_code_exactly_once():
    assert mutants.check_patterns() == []
    assert len(mutants.MUTANTS) == 13


def test_d_trained_on_the_wrong_labels_is_caught(capsys):
    # a copy of the checkout with dcgan.py's D loss on the wrong labels: pytest fails there, at once
    assert mutants.main(["1"]) == 0
    assert "1 of 1 mutants killed" in capsys.readouterr().out
