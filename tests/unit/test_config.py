"""bakgrab.tasks.config: one precedence (flag > BAKGRAB_* > file > default), checked values."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest

from bakgrab.tasks import config
from bakgrab.tasks.config import Settings, load, parse_duration, parse_size
from bakgrab.tasks.errors import ConfigError


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """/etc/bakgrab/bakgrab.toml of the machine running the tests is never read."""
    path = tmp_path / "etc-bakgrab.toml"
    monkeypatch.setattr(config, "SYSTEM_CONFIG", path)
    return path


@pytest.fixture
def write(tmp_path: Path) -> Any:
    def write(text: str, name: str = "bakgrab.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def test_defaults() -> None:
    """With no flag, no variable and no file, every setting is its named default."""
    assert load({}, None, {}) == Settings()
    assert Settings().min_keep == 1 and Settings().min_free_abs == "1G"


# (setting, file value as TOML, env value, flag value, typed values in that order)
PRECEDENCE = [
    ("concurrency", "3", "4", 5, (3, 4, 5)),
    ("min_free_avg", "0.5", "1.5", 2.5, (0.5, 1.5, 2.5)),
    ("broker", '"redis://file:6379/0"', "redis://env:6379/0", "redis://flag:6379/0",
     ("redis://file:6379/0", "redis://env:6379/0", "redis://flag:6379/0")),
    ("min_free_abs", '"2G"', "3G", "4G", ("2G", "3G", "4G")),
    ("rsync_timeout", "60", "70", 80, (60, 70, 80)),
]


@pytest.mark.parametrize(("name", "in_file", "in_env", "in_flag", "typed"), PRECEDENCE)
@pytest.mark.parametrize(
    ("use_file", "use_env", "use_flag"), list(itertools.product([False, True], repeat=3))
)
def test_precedence(
    write: Any, name: str, in_file: str, in_env: str, in_flag: Any,
    typed: tuple[Any, Any, Any], use_file: bool, use_env: bool, use_flag: bool,
) -> None:
    """A flag beats BAKGRAB_<NAME>, which beats the config file, which beats the
    default; values arrive typed."""
    path = write(f"{name} = {in_file}\n" if use_file else "")
    environ = {f"BAKGRAB_{name.upper()}": in_env} if use_env else {}
    flags = {name: in_flag} if use_flag else {}
    expected = (
        typed[2] if use_flag else typed[1] if use_env else typed[0] if use_file
        else getattr(Settings(), name)
    )
    got = getattr(load(flags, path, environ), name)
    assert got == expected
    assert type(got) is type(expected)


def test_none_flags_and_empty_env_do_not_shadow(write: Any) -> None:
    """A flag left at None (click's default) and an empty variable do not hide
    the levels below them."""
    path = write("concurrency = 3\nqueue = 'fromfile'\n")
    got = load({"concurrency": None, "queue": None}, path,
               {"BAKGRAB_CONCURRENCY": "", "BAKGRAB_QUEUE": "fromenv"})
    assert (got.concurrency, got.queue) == (3, "fromenv")


def test_unknown_flags_are_ignored() -> None:
    """Flags that are not settings (other CLI options) do not reach Settings."""
    assert load({"source": "/srv", "verbose": True}, None, {}) == Settings()


def test_bakgrab_section_is_read(write: Any) -> None:
    """Settings may sit in a [bakgrab] table."""
    path = write("[bakgrab]\nmin_keep = 3\nbroker = 'redis://h:6380/1'\n")
    got = load({}, path, {})
    assert (got.min_keep, got.broker) == (3, "redis://h:6380/1")


def test_config_path_flag_beats_env(write: Any) -> None:
    """--config beats BAKGRAB_CONFIG; BAKGRAB_CONFIG beats the system file."""
    flag_file = write("min_keep = 2\n", "flag.toml")
    env_file = write("min_keep = 3\n", "env.toml")
    config.SYSTEM_CONFIG.write_text("min_keep = 4\n")
    env = {"BAKGRAB_CONFIG": str(env_file)}
    assert load({}, flag_file, env).min_keep == 2
    assert load({}, None, env).min_keep == 3
    assert load({}, None, {}).min_keep == 4


def test_missing_named_config_file(tmp_path: Path) -> None:
    """A config file named by flag or variable must exist; the error names it."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        load({}, missing, {})
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        load({}, None, {"BAKGRAB_CONFIG": str(missing)})


def test_invalid_toml_names_the_file(write: Any) -> None:
    """A file that is not TOML is refused, naming it."""
    path = write("min_keep = = 3\n")
    with pytest.raises(ConfigError, match=f"config file {path}"):
        load({}, path, {})


@pytest.mark.parametrize(
    "text", ["concurency = 3\n", "[bakgrab]\nmin_keep = 2\nstorgae = '/srv'\n"]
)
def test_unknown_keys_in_file_refused(write: Any, text: str) -> None:
    """A misspelt setting in the file is refused, naming it."""
    path = write(text)
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) (concurency|storgae)"):
        load({}, path, {})


@pytest.mark.parametrize(
    ("text", "outside"),
    [
        ("min_keep = 3\n\n[bakgrab]\nqueue = 'q'\n", "min_keep"),
        ("[bakgrab]\nqueue = 'q'\n\n[other]\nmin_keep = 3\n", "other"),
    ],
)
def test_settings_outside_the_bakgrab_table_are_refused(
    write: Any, text: str, outside: str
) -> None:
    """A file with a [bakgrab] table may hold nothing else: a setting written
    before the header (TOML puts it at the root) is refused, naming it and the
    file, not silently dropped."""
    path = write(text)
    with pytest.raises(ConfigError, match=f"config file {path}") as info:
        load({}, path, {})
    assert outside in str(info.value)
    assert "[bakgrab]" in str(info.value)


def test_file_without_a_bakgrab_table_is_all_settings(write: Any) -> None:
    """A file without a [bakgrab] table holds the settings at its root."""
    path = write("min_keep = 3\nqueue = 'q'\n")
    got = load({}, path, {})
    assert (got.min_keep, got.queue) == (3, "q")


@pytest.mark.parametrize("text", ["bakgrab = 5\n", "bakgrab = 'x'\n", "bakgrab = [1]\n"])
def test_bakgrab_key_that_is_not_a_table(write: Any, text: str) -> None:
    """`bakgrab = 5` is a ConfigError naming the file, not a crash."""
    path = write(text)
    with pytest.raises(ConfigError, match=f"config file {path}: \\[bakgrab\\]"):
        load({}, path, {})


@pytest.mark.parametrize(
    ("environ", "setting"),
    [
        ({"BAKGRAB_CONCURRENCY": "many"}, "concurrency"),
        ({"BAKGRAB_CONCURRENCY": "1.5"}, "concurrency"),
        ({"BAKGRAB_MIN_FREE_AVG": "half"}, "min_free_avg"),
        ({"BAKGRAB_MIN_KEEP": "0"}, "min_keep"),
        ({"BAKGRAB_CONCURRENCY": "0"}, "concurrency"),
        ({"BAKGRAB_MAX_RETRIES": "-1"}, "max_retries"),
        ({"BAKGRAB_RSYNC_TIMEOUT": "0"}, "rsync_timeout"),
        ({"BAKGRAB_CONNECT_TIMEOUT": "-5"}, "connect_timeout"),
        ({"BAKGRAB_SERVER_ALIVE_INTERVAL": "0"}, "server_alive_interval"),
        ({"BAKGRAB_JOB_TIMEOUT": "0"}, "job_timeout"),
        ({"BAKGRAB_BWLIMIT": "fast"}, "bwlimit"),
        ({"BAKGRAB_QUEUE": "a queue"}, "queue"),
        ({"BAKGRAB_QUEUE": "q;x"}, "queue"),
        ({"BAKGRAB_FLOWER_PORT": "70000"}, "flower_port"),
    ],
)
def test_invalid_values_name_the_setting(environ: dict[str, str], setting: str) -> None:
    """An invalid value is a ConfigError whose message names the setting."""
    with pytest.raises(ConfigError) as info:
        load({}, None, environ)
    assert setting in str(info.value)
    assert info.value.exit_code == 3


@pytest.mark.parametrize(
    ("environ", "setting"),
    [({"BAKGRAB_MIN_FREE_ABS": "lots"}, "min_free_abs"),
     ({"BAKGRAB_STALE_AFTER": "soon"}, "stale_after"),
     ({"BAKGRAB_STALE_AFTER": "0"}, "stale_after")],
)
def test_invalid_size_and_duration_name_the_setting(
    environ: dict[str, str], setting: str
) -> None:
    """An invalid size or duration setting is a ConfigError naming the setting
    ("setting min_free_abs: size 'lots': ...")."""
    with pytest.raises(ConfigError, match=rf"^setting {setting}: ") as info:
        load({}, None, environ)
    assert info.value.exit_code == 3


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("concurrency = 2.7\n", "concurrency"),
        ("concurrency = 2.0\n", "concurrency"),
        ("concurrency = true\n", "concurrency"),
        ("concurrency = [2]\n", "concurrency"),
        ("min_free_avg = true\n", "min_free_avg"),
        ("min_free_avg = [1.5]\n", "min_free_avg"),
        ("broker = { host = 'x' }\n", "broker"),
        ("broker = ['redis://h']\n", "broker"),
        ("queue = false\n", "queue"),
        ("bwlimit = 1979-05-27\n", "bwlimit"),
        ("[bakgrab]\nconcurrency = 2.7\n", "concurrency"),
    ],
)
def test_wrong_toml_types_refused(write: Any, text: str, setting: str) -> None:
    """A TOML value of the wrong type is refused, naming the setting, not coerced."""
    path = write(text)
    with pytest.raises(ConfigError, match=rf"^setting {setting}: "):
        load({}, path, {})


@pytest.mark.parametrize(
    ("text", "setting", "expected"),
    [
        ("concurrency = 3\n", "concurrency", 3),
        ("min_free_avg = 2\n", "min_free_avg", 2.0),
        ("min_free_avg = 1.5\n", "min_free_avg", 1.5),
        ("queue = 'q1'\n", "queue", "q1"),
        ("min_free_abs = '5G'\n", "min_free_abs", "5G"),
    ],
)
def test_right_toml_types_kept(write: Any, text: str, setting: str, expected: Any) -> None:
    """TOML values of the setting's type are taken as they are (an integer for
    a float setting too)."""
    got = getattr(load({}, write(text), {}), setting)
    assert got == expected and type(got) is type(expected)


def test_text_from_environment_and_flags_is_still_parsed() -> None:
    """BAKGRAB_* variables and flags given as text are parsed to the setting's type."""
    got = load({"concurrency": "4"}, None,
               {"BAKGRAB_MIN_FREE_AVG": "1.5", "BAKGRAB_MIN_KEEP": "2"})
    assert (got.concurrency, got.min_free_avg, got.min_keep) == (4, 1.5, 2)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "infinity", "-1", "-0.5"])
def test_min_free_avg_must_be_finite_and_not_negative(value: str) -> None:
    """min_free_avg that is not a finite number >= 0 is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="min_free_avg") as info:
        load({}, None, {"BAKGRAB_MIN_FREE_AVG": value})
    assert info.value.exit_code == 3


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1.0", "-1"])
def test_min_free_avg_from_toml_must_be_finite_and_not_negative(
    write: Any, value: str
) -> None:
    """TOML's own nan and inf are refused too, when the file is loaded."""
    path = write(f"min_free_avg = {value}\n")
    with pytest.raises(ConfigError, match="min_free_avg"):
        load({}, path, {})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_min_free_avg_from_flags_must_be_finite(value: float) -> None:
    """A float flag (click parses "nan" to a float) is refused the same way."""
    with pytest.raises(ConfigError, match="min_free_avg"):
        load({"min_free_avg": value}, None, {})


def test_nan_min_free_avg_never_reaches_need() -> None:
    """Why the checks above matter: need() cannot compute with a NaN average, so
    load() refuses it and need() only ever sees finite factors."""
    from bakgrab.worker.retention import Usage, need

    with pytest.raises(ConfigError, match="min_free_avg"):
        load({}, None, {"BAKGRAB_MIN_FREE_AVG": "nan"})
    settings = load({}, None, {"BAKGRAB_MIN_FREE_AVG": "3", "BAKGRAB_MIN_FREE_ABS": "0",
                               "BAKGRAB_MIN_FREE_INODES": "0"})
    assert math.isfinite(settings.min_free_avg)
    got = need(settings, Usage(1, 3 << 30, 1, 3000, True), 3)
    assert (got.bytes, got.inodes) == (3 << 30, 3000)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100000", 100000),
        ("0", 0),
        ("512K", 512 << 10),
        ("512M", 512 << 20),
        ("5G", 5 << 30),
        ("2T", 2 << 40),
        ("1.5G", 3 << 29),
        ("5g", 5 << 30),
        ("5GB", 5 << 30),
        ("5GiB", 5 << 30),
        (" 5 G ", 5 << 30),
        (5, 5),
    ],
)
def test_parse_size(text: Any, expected: int) -> None:
    """Sizes are bytes with optional binary K/M/G/T units, any case, B/iB optional."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-5G", "5X", "5 GB extra", "five", "1e9", "5PB"])
def test_parse_size_refuses(text: str) -> None:
    """Anything else is a ConfigError quoting the text."""
    with pytest.raises(ConfigError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("30m", 1800), ("36h", 36 * 3600), ("2d", 2 * 86400),
     ("1w", 7 * 86400), ("1h30m", 5400), ("1.5h", 5400), (" 2D ", 2 * 86400)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Durations are seconds, or numbers with s/m/h/d/w units, summed."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0h", "h", "-1h", "1y", "1h 30m", "soon"])
def test_parse_duration_refuses(text: str) -> None:
    """Zero, negative, unknown units and other text are refused."""
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(text)


def test_env_is_only_read_from_the_mapping_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """load(environ=...) reads that mapping, not os.environ (tests can reset it)."""
    monkeypatch.setenv("BAKGRAB_MIN_KEEP", "7")
    assert load({}, None, {}).min_keep == 1
    monkeypatch.delenv("BAKGRAB_CONFIG", raising=False)
    assert load({}, None, None).min_keep == 7
