"""What a host, a guest or a server says reaches the administrator's terminal escaped:
no control sequence (clear screen, set title, cursor moves) and no rich markup gets
through (F6 of the second adversarial pass)."""

from __future__ import annotations

import pytest

from virtua.cli import render

HOSTILE = "kvm\x1b[2J\x1b]0;owned\x07\r[bold red]fake[/]"


def test_printable_escapes_control_characters_and_keeps_newlines() -> None:
    assert render.printable(HOSTILE) == "kvm\\x1b[2J\\x1b]0;owned\\x07\\x0d[bold red]fake[/]"
    assert render.printable("a\n\tb") == "a\n\tb"
    assert render.printable("caf\u00e9 \u00a0") == "caf\u00e9 \u00a0", "printable text is untouched"


@pytest.mark.parametrize("shape", ["list", "dict"])
def test_tables_on_a_terminal_and_in_a_pipe_carry_no_escape(
    shape: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    result = [{"name": "h1", "accel": HOSTILE}] if shape == "list" else {"name": "h1", "accel": HOSTILE}
    render.emit(result, as_json=False)  # a pipe
    monkeypatch.setattr(render.out, "_force_terminal", True)
    render.emit(result, as_json=False)  # a terminal: rich tables
    out = capsys.readouterr().out
    assert "\x1b]0;" not in out and "\x07" not in out and "\x1b[2J" not in out and "\r" not in out
    assert out.count("[bold red]fake[/]") == 2, "markup shown as text, not applied"


def test_a_log_line_stays_one_line_whatever_a_peer_said(capsys: pytest.CaptureFixture[str]) -> None:
    import logging
    import sys

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(render.OneLineFormatter("%(name)s: %(message)s"))
    log = logging.getLogger("virtua.test-render")
    log.addHandler(handler)
    try:
        log.warning("restart of %s failed: %s", "a/b", "x\nvirtua.manager: host good is offline" + HOSTILE)
    finally:
        log.removeHandler(handler)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "\x1b" not in out and "\\nvirtua.manager" in out, out
