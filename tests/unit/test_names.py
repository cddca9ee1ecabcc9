"""Names are validated with full matches: nothing after the last allowed character (a
trailing newline, a NUL), no path tricks, no lookalikes, no over-long parts; in-process,
through the CLI and through the daemon's API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from virtua.errors import InvalidArgument
from virtua.storage.names import check_name, parse_ref
from virtua.units import parse_size

BAD_NAMES = {
    "trailing newline": "nl\n",
    "leading newline": "\nnl",
    "inner newline": "a\nb",
    "trailing NUL": "nul\0",
    "parent dir": "..",
    "path escape": "../etc",
    "slash": "a/b",
    "cyrillic a lookalike": "p\u0430ol",
    "fullwidth digit": "pool\uff11",
    "arabic-indic digit": "\u0661",
    "trailing space": "pool ",
    "empty": "",
    "65 characters": "a" * 65,
    "leading dot": ".hidden",
    "leading dash": "-rf",
}

BAD_REFS = {
    "trailing newline": "p/vol\n",
    "newline before snapshot": "p/vol\n@s",
    "snapshot with newline": "p/vol@s\n",
    "NUL in volume": "p/v\0l",
    "dot-dot volume": "p/..",
    "dot-dot path": "p/../q",
    "two slashes": "p/a/b",
    "lookalike pool": "\u0440/vol",
    "over-long volume": "p/" + "v" * 65,
    "over-long snapshot": "p/v@" + "s" * 65,
}


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_check_name_refuses(name: str) -> None:
    with pytest.raises(InvalidArgument, match="bad pool name"):
        check_name(name, "pool name")


@pytest.mark.parametrize("ref", BAD_REFS.values(), ids=BAD_REFS.keys())
def test_parse_ref_refuses(ref: str) -> None:
    with pytest.raises(InvalidArgument, match="bad name"):
        parse_ref(ref)


def test_good_names_pass_unchanged() -> None:
    assert check_name("a" * 64) == "a" * 64
    assert check_name("web-1.prod_2+x") == "web-1.prod_2+x"
    assert tuple(parse_ref("p/v@s1")) == ("p", "v", "s1")
    assert tuple(parse_ref("p/v")) == ("p", "v", None)


@pytest.mark.parametrize(
    "value",
    [True, False, -1, "-1", "1e3", "\u0661\u0662K", "12\n", "", "K", "1.5", [], None, 1.5, 2**63, "8E", "9" * 30],
    ids=repr,
)
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(value)  # type: ignore[arg-type]


def test_parse_size_is_exact() -> None:
    # a float would round these: 2**53 + 1 bytes, and 1.5G
    assert parse_size(str(2**53 + 1)) == 2**53 + 1
    assert parse_size("1.5G") == 3 << 29
    assert parse_size(" 4 KiB ") == 4096
    assert parse_size(0) == 0
    assert parse_size("8191P") == 8191 << 50


def test_seed_keys_are_matched_in_full() -> None:
    from virtua.vmm.image import seed_text

    assert "VIRTUA_ROLE=db\n" in seed_text(role="db")
    with pytest.raises(InvalidArgument, match="bad seed key"):
        seed_text(**{"role\n": "db"})


# ---------------------------------------------------------------------- through the CLI


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VIRTUA_HOME=str(home), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "virtua.cli", *args], capture_output=True, text=True, env=env)


def one_line_error(r: subprocess.CompletedProcess[str], code: int, match: str) -> None:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("virtua: error: ") and match in lines[0], r.stderr


def test_cli_refuses_bad_names_and_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for name in ("nl\n", "p\u0430ol", "../up"):
        one_line_error(cli(home, "pool", "create", name, "--capacity", "64M"), 2, "bad pool name")
    assert not (home / "pools").exists() or list((home / "pools").iterdir()) == []
    r = cli(home, "pool", "create", "p", "--capacity", "64M")
    assert r.returncode == 0, r.stderr
    for ref in ("p/v\n", "p/v@s\n"):
        one_line_error(cli(home, "volume", "create", ref, "--size", "1M"), 2, "bad name")
    one_line_error(cli(home, "volume", "create", "p/v", "--size", "-1M"), 2, "bad size")
    one_line_error(cli(home, "volume", "create", "p/v", "--size", "99999999999P"), 2, "bad size")
    r = cli(home, "volume", "list", "--json")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    assert sorted(p.name for p in (home / "pools").iterdir()) == ["p"]
