"""What the command-line tests read from a failed command: its one error line."""


def error_line(capsys):
    """The one line a failed command printed on stderr (and nothing that looks like a traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]
