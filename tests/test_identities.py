"""`minilm check`: the identities it prints hold, and a broken identity is reported as a failure."""

from minilm import cli, identities


def test_every_identity_holds():
    for name, diff, tol in identities.run_all(seed=1):
        assert diff <= tol, name


def test_check_command_prints_and_succeeds(capsys):
    assert cli.main(["check"]) == 0
    assert "5 of 5 identities hold" in capsys.readouterr().out


def test_check_command_fails_when_an_identity_breaks(monkeypatch, capsys):
    def broken(rng):
        return "a broken identity", 1.0, 1e-9
    monkeypatch.setattr(identities, "CHECKS", identities.CHECKS + (broken,))
    assert cli.main(["check"]) == 1
    assert "FAILED" in capsys.readouterr().out
