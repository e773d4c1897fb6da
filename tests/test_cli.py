"""The command line: `python -m chameleon doctor` and argument errors."""
import pytest

from chameleon.__main__ import main
from chameleon.assets import ASSETS


def test_doctor_finds_every_asset(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "Hugging Face hub" in out
    for key, asset in ASSETS.items():
        line = next((row for row in out.splitlines() if row.split()[1:2] == [key]), None)
        assert line is not None, f"doctor does not mention {key}:\n{out}"
        assert line.split()[0] == "found", line
        assert str(asset.path()) in line


@pytest.mark.parametrize("argv", [
    ["doctor", "--rank", "x"],
    ["doctor", "--profile", "nonexistent"],
    ["doctor", "--cache-body", "maybe"],
    ["no-such-command"],
    [],
])
def test_bad_arguments_exit_with_argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert "error" in capsys.readouterr().err
