"""The `guardrail` command, run in-process: output and exit codes (0 ok, 1 match or error, 2 usage error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardrail.cli import main


@pytest.fixture
def blocklist_file(memorized_blocklist, tmp_path):
    return str(memorized_blocklist.save(tmp_path / "bl.safetensors"))


def test_info_verifies_and_describes_a_blocklist(blocklist_file, capsys):
    assert main(["info", blocklist_file, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 1 and info["checksum"] == "ok" and info["spec"]["model"] == "ViT-S-32"


def test_info_on_a_tampered_file_exits_1_with_the_reason(blocklist_file, capsys):
    path = Path(blocklist_file)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["info", blocklist_file]) == 1
    assert "checksum" in capsys.readouterr().err


def test_check_exits_1_on_a_match_and_0_when_clean(blocklist_file, weights_file, unguarded, tmp_path, capsys):
    for slot in (0, 1):
        unguarded[slot].save(tmp_path / f"slot{slot}.png")
    clean = ["check", "-b", blocklist_file, "--pretrained", str(weights_file), str(tmp_path / "slot0.png")]
    assert main(clean) == 0
    assert main([*clean, str(tmp_path / "slot1.png"), "--json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [line["matched"] for line in lines] == [False, True] and lines[1]["entry_id"] == "seed-1"


def test_check_reports_unreadable_images_and_exits_1(blocklist_file, weights_file, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["check", "-b", blocklist_file, "--pretrained", str(weights_file), str(tmp_path / "broken.png")]) == 1
    assert "ERROR" in capsys.readouterr().out


def test_check_without_the_weights_file_names_the_flag(blocklist_file, tmp_path, capsys):
    assert main(["check", "-b", blocklist_file, str(tmp_path / "x.png")]) == 1
    assert "--pretrained" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["check"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        main(["no-such-verb"])
    assert exited.value.code == 2


def test_demo_verb_passes_every_flag_ci_uses_to_run_demo(monkeypatch, tmp_path):
    """`.ci/run` drives `guardrail demo`; the verb's flags must reach `run_demo` unchanged."""
    import guardrail.demo

    calls = []
    monkeypatch.setattr(guardrail.demo, "run_demo", lambda out, **options: calls.append((out, options)))
    argv = ["demo", "--out", str(tmp_path), "--samples", "8", "--model", "ViT-B-32", "--pretrained", "w.safetensors",
            "--threshold", "0.9", "--seed", "3", "--steps", "5", "--threads", "2", "--pipeline", "photos"]
    assert main(argv) == 0
    assert calls == [(str(tmp_path), {"samples": 8, "model": "ViT-B-32", "pretrained": "w.safetensors", "seed": 3,
                                      "steps": 5, "threshold": 0.9, "threads": 2, "pipeline": "photos"})]


def test_demo_usage_errors_exit_2(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--samples", "0"]) == 2
    assert "samples" in capsys.readouterr().err
