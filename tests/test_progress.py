"""Live progress (iaptnet/progress.py, issue 11): on a terminal, `iaptnet run` leaves one line
per stage on stderr and reports each round's answers as they arrive; with `--quiet`, `--json`
or a pipe it shows nothing, and stdout carries the results alone either way."""

from __future__ import annotations

import re
import sys

import pytest
from glmcase import write_network, write_study
from test_node_lost import COLUMNS, make_sites

from iaptnet.cli import main
from iaptnet.progress import LiveProgress


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("progress")
    write_network(folder, make_sites(), COLUMNS)
    paths = [
        write_study(folder / "a.toml", name="a", family="binomial", formula="y ~ x + z + g", exposure="x"),
        write_study(folder / "b.toml", name="b", family="poisson", formula="count ~ x + z + g", exposure="x"),
    ]
    return folder, paths


def run(studies, tmp_path, monkeypatch, *flags: str) -> list[tuple]:
    """`iaptnet run` as on a terminal; the rounds the progress display was told of."""
    folder, paths = studies
    rounds: list[tuple] = []
    original = LiveProgress.round

    def recorded(self, kind, round_no, answered, expected):
        if self.enabled:
            rounds.append((kind, round_no, answered, expected))
        original(self, kind, round_no, answered, expected)

    monkeypatch.setattr(LiveProgress, "round", recorded)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    argv = ["run", *map(str, paths), "--network", str(folder / "network.toml"), "--out", str(tmp_path / "out")]
    assert main([*argv, *flags]) == 0
    return rounds


def test_a_terminal_run_shows_each_stage_and_every_round(studies, tmp_path, monkeypatch, capsys):
    rounds = run(studies, tmp_path, monkeypatch, "--workers", "1")
    captured = capsys.readouterr()
    # One line left per stage: the run, then the regressions' shared conversation.
    done = [line for line in captured.err.splitlines() if line.strip()]
    assert len(done) == 2, captured.err
    assert re.fullmatch(r"✓ running 2 studies \(\d+\.\d s\)", done[0]), captured.err
    assert re.fullmatch(r"✓ 2 regression\(s\) in shared rounds \(\d+\.\d s\)", done[1]), captured.err
    assert "Traceback" not in captured.err
    # Every round of the shared conversation is shown, with its answers counted up to the 4 nodes.
    assert {kind for kind, *_ in rounds} >= {"glm.prepare", "glm.round"}
    for kind, round_no, answered, expected in rounds:
        assert expected == 4 and 0 <= answered <= expected, (kind, round_no)
    finished = {(kind, r) for kind, r, answered, expected in rounds if answered == expected}
    assert finished == {(kind, r) for kind, r, *_ in rounds}  # each round reaches 4 of 4
    # The results go to stdout, the progress only to stderr.
    assert "nodes: 4 contributed" in captured.out and "✓" not in captured.out


@pytest.mark.parametrize("flag", ["--quiet", "--json"])
def test_quiet_and_json_runs_show_no_progress(studies, tmp_path, monkeypatch, capsys, flag):
    rounds = run(studies, tmp_path, monkeypatch, flag)
    assert rounds == [] and capsys.readouterr().err == ""
