"""The command line: `python -m chameleon doctor` and argument errors."""
import argparse

import pytest

from chameleon.__main__ import build_parser, main
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


def test_generate_checks_its_input_before_loading_a_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["generate", "--run", str(tmp_path), "--max-new-tokens", "-3", "Hi"])
    assert err.value.code == 2 and "must be at least 1, got -3" in capsys.readouterr().err
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("Caf\xe9 au lait\n".encode("latin-1"))
    assert main(["generate", "--run", str(tmp_path), "--prompts-file", str(latin1)]) == 2
    message = capsys.readouterr().err
    assert str(latin1) in message and "byte 0xe9" in message and "save it as UTF-8" in message


def test_every_option_has_a_help_line(capsys):
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help line"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option, words in [("--seed", "the one seed"), ("--rank", "LoRA rank r"), ("--score-from", "never scored"),
                          ("--results-dir", "$CHAMELEON_OUTPUTS"), ("--n-clusters", "k-means k")]:
        assert f"{option} " in out and words in out
