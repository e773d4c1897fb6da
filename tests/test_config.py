"""Config: profiles, task overrides and validation of every choice."""
import json
import re
import subprocess
import sys

import pytest

from chameleon.__main__ import _config, build_parser
from chameleon.config import PROFILES, TASKS, Config
from chameleon.regimes import CONDITIONINGS, PROTOCOLS
from chameleon.regimes import REGIMES
from chameleon.runs import read_config


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", ["smoke", "cpu", "study", "hub"])
def test_every_profile_is_valid_for_every_task_and_reads_back_from_a_run_folder(tmp_path, name, task):
    cfg = Config.from_profile(name, task=task)  # validated: a profile that breaks a rule raises here
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))  # what training writes
    assert read_config(tmp_path) == cfg  # what serving and `generate` read back


def test_hub_profile_is_the_papers_setting():
    cfg = Config.from_profile("hub")
    assert (cfg.backbone, cfg.corpus, cfg.rank, cfg.alpha) == ("gpt2", "wikitext-2-raw-v1", 4, 1.0)
    assert (cfg.batch_size, cfg.max_length, cfg.lr, cfg.epochs) == (32, 256, 5e-4, 10)


def test_hub_instructions_override():
    cfg = Config.from_profile("hub", task="instructions")
    assert (cfg.batch_size, cfg.max_length, cfg.lr) == (16, 512, 2e-4)
    assert cfg.instructions == "alpaca"


def test_explicit_override_beats_the_task_override():
    assert Config.from_profile("hub", task="instructions", batch_size=4).batch_size == 4


def test_old_names_of_the_protocol_and_profile_are_accepted(tmp_path):
    """"paper" once named the protocol, a profile and the publication: the first two are renamed."""
    cfg = Config.from_profile("paper", protocol="paper")
    assert (cfg.profile, cfg.protocol) == ("hub", "authors")
    assert Config(**{**cfg.to_dict(), "profile": "paper", "protocol": "paper"}).protocol == "authors"  # old run folders
    args = build_parser().parse_args(["train", "--profile", "paper", "--protocol", "paper"])  # the CLI's spelling
    assert (_config(args).profile, _config(args).protocol) == ("hub", "authors")


def test_unknown_profile_lists_the_choices():
    with pytest.raises(ValueError, match="unknown profile 'fast'") as err:
        Config.from_profile("fast")
    for name in PROFILES:
        assert name in str(err.value)


@pytest.mark.parametrize("field, value, allowed", [
    ("regime", "lorra", REGIMES),
    ("protocol", "exact", PROTOCOLS),
    ("conditioning", "prefixes", [c for c, row in CONDITIONINGS.items() if "lm" in row.tasks]),
])
def test_unknown_choice_lists_the_choices(field, value, allowed):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")) as err:
        Config.from_profile("smoke", **{field: value})
    for choice in allowed:
        assert repr(choice) in str(err.value)


def test_conditioning_depends_on_the_task():
    assert Config.from_profile("smoke", task="instructions", conditioning="task_input").conditioning == "task_input"
    with pytest.raises(ValueError, match="conditioning='task_input'"):
        Config.from_profile("smoke", task="lm", conditioning="task_input")


def test_replace_validates():
    cfg = Config.from_profile("smoke")
    assert cfg.replace(regime="lora").regime == "lora"
    with pytest.raises(ValueError, match="regime"):
        cfg.replace(regime="nope")


@pytest.mark.parametrize("field", ["rank", "batch_size", "epochs", "n_clusters"])
def test_nonpositive_sizes_raise(field):
    with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
        Config.from_profile("smoke", **{field: 0})


@pytest.mark.parametrize("max_length", [0, 1])
def test_max_length_below_two_blames_the_option(max_length):
    with pytest.raises(ValueError, match="max_length must be at least 2 tokens"):
        Config.from_profile("smoke", max_length=max_length, conditioning="batch_mean")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "CPU", ""])
def test_unknown_device_is_refused(device):
    with pytest.raises(ValueError, match=f"device={device!r} is not valid here; choose 'auto', 'cpu', 'cuda'"):
        Config.from_profile("smoke", device=device)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_known_devices_pass(device):
    assert Config.from_profile("smoke", device=device).device == device


def test_config_imports_nothing_heavy():
    """Config errors must come at once, not after ~10 s of torch imports."""
    code = "import sys, chameleon.config; print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("prefix_tokens", [0, 31, 40])
def test_prefix_tokens_out_of_range(prefix_tokens):
    # smoke: max_length 32, so prefix_tokens must lie in [1, 31)
    with pytest.raises(ValueError, match="prefix_tokens"):
        Config.from_profile("smoke", conditioning="prefix", prefix_tokens=prefix_tokens)


def test_prefix_tokens_in_range():
    assert Config.from_profile("smoke", conditioning="prefix", prefix_tokens=30).prefix_tokens == 30


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("CHAMELEON_PROFILE", "smoke")
    assert Config.from_profile().profile == "smoke"
    assert Config.from_profile().max_length == 32
    monkeypatch.delenv("CHAMELEON_PROFILE")
    assert Config.from_profile().profile == "cpu"
    monkeypatch.setenv("CHAMELEON_PROFILE", "nonsense")
    with pytest.raises(ValueError, match="unknown profile"):
        Config.from_profile()


def test_score_from_must_leave_a_token_to_score():
    assert Config.from_profile("smoke", score_from=8).score_from == 8
    with pytest.raises(ValueError, match="score_from=31 must lie in"):
        Config.from_profile("smoke", score_from=31)
