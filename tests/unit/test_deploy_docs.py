"""deploy/'s documentation matches the code: every setting, file and option it names."""

from __future__ import annotations

import dataclasses
import re
import runpy
import subprocess
import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from bakgrab.tasks import config
from bakgrab.tasks.cli import main

REPO = Path(__file__).resolve().parent.parent.parent
DEPLOY = REPO / "deploy"
EXAMPLE = DEPLOY / "bakgrab.toml.example"
README = DEPLOY / "README.md"
SCRIPTS = [DEPLOY / "backup-host" / "install.sh", DEPLOY / "backup-host" / "add-client.sh",
           DEPLOY / "client" / "install.sh"]
REGENERATE = ("regenerate it: .venv/bin/python deploy/gen-config-example.py "
              "> deploy/bakgrab.toml.example")


def example_settings() -> dict[str, object]:
    """The example with every ``#name = value`` line uncommented, parsed."""
    text = EXAMPLE.read_text()
    uncommented = re.sub(r"^#(\w+ = )", r"\1", text, flags=re.M)
    return dict(tomllib.loads(uncommented)["bakgrab"])


def test_example_lists_every_setting_with_its_default() -> None:
    """Each field of Settings appears in deploy/bakgrab.toml.example, with
    the dataclass's default, and nothing else does."""
    listed = example_settings()
    fields = {f.name: f.default for f in dataclasses.fields(config.Settings)}
    missing = sorted(set(fields) - set(listed))
    assert not missing, f"settings missing from {EXAMPLE.name}: {missing}; {REGENERATE}"
    assert sorted(set(listed) - set(fields)) == [], REGENERATE
    for name, default in fields.items():
        assert listed[name] == default, f"{name}: {listed[name]!r} != {default!r}; {REGENERATE}"


def test_example_loads_as_a_config_file(tmp_path: Path) -> None:
    """As shipped (all commented out) it is a valid config file giving the defaults."""
    assert config.load(config_file=EXAMPLE, environ={}) == config.Settings()


def test_every_setting_is_explained_above_its_line() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for field in dataclasses.fields(config.Settings):
        at = next(i for i, ln in enumerate(lines) if ln.startswith(f"#{field.name} = "))
        assert lines[at - 1] == f"# (environment: BAKGRAB_{field.name.upper()})"
        assert lines[at - 2].startswith("# ") and lines[at - 2][2:].strip(), field.name


def test_example_is_what_the_generator_prints() -> None:
    """The committed example is deploy/gen-config-example.py's output: a
    docstring changed in tasks/config.py shows up here."""
    render = runpy.run_path(str(DEPLOY / "gen-config-example.py"))["render"]
    assert EXAMPLE.read_text() == render(), REGENERATE


def test_readme_names_only_files_that_exist() -> None:
    text = README.read_text()
    named = set(re.findall(r"\bdeploy/[\w./-]+[\w]", text))
    assert named
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert missing == []


FOREIGN_OPTIONS = {
    "--no-install-recommends",  # apt-get
    "--now",  # systemctl enable --now
    "--askpass", "--raw",  # redis-cli
    "--reuid", "--regid", "--init-groups", "--inh-caps", "--ambient-caps", "--bounding-set",
    "--no-new-privs",  # setpriv, in the cron line
    "--super",  # rsync
}


def help_texts() -> str:
    out = []
    for path in SCRIPTS:
        done = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True,
                              timeout=10)
        assert done.returncode == 0, done.stderr
        out.append(done.stdout)
    runner = CliRunner()
    for name in main.list_commands(click.Context(main)):
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, result.output
        out.append(result.output)
    return "\n".join(out)


def test_readme_uses_only_options_that_exist() -> None:
    """Every --option deploy/README.md shows is one that a deploy script or a
    bakgrab command accepts (or belongs to a listed system tool)."""
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", README.read_text()))
    known = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", help_texts()))
    assert sorted(shown - known - FOREIGN_OPTIONS) == []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_help_lists_every_option_the_script_parses(script: Path) -> None:
    parsed = set(re.findall(r"^\s+(--[a-z-]+)\)", script.read_text(), re.M))
    done = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                          timeout=10)
    assert parsed and done.returncode == 0
    assert sorted(o for o in parsed if o not in done.stdout) == []


def test_readme_cron_line_is_the_one_install_writes() -> None:
    """The cron line in the README is the template rendered with the default
    paths (the integration test runs the rendered one)."""
    template = (DEPLOY / "client" / "bakgrab-backup.cron.in").read_text()
    line = next(ln for ln in template.splitlines() if ln.startswith("@MINUTE@"))
    values = {"MINUTE": "17", "HOUR": "3", "USER": "bakgrab-client",
              "HOME": "/var/lib/bakgrab-client", "CLIENT_ENV": "/etc/bakgrab/client.env",
              "CONFIG": "/etc/bakgrab/bakgrab.toml", "BAKGRAB": "/opt/bakgrab/bin/bakgrab",
              "CRON_NAME": '"$(hostname)"', "SOURCE": "/",
              "TUNNEL": "bakgrab-tunnel@backup.example.org", "EXCLUDE": "/etc/bakgrab/exclude"}
    rendered = re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], line)
    assert rendered in README.read_text().splitlines()
