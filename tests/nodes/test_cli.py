"""CLI: errors a user can cause are one line on stderr and exit code 2; the client subcommands work."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes import cli, roles_client


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgebus: ")
    assert "\n" not in err
    assert "Traceback" not in err
    return err


def test_bad_node_config_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "n.toml"
    path.write_text(
        '[node]\nname = "a"\nmodel = "m"\nroles = ["answerer"]\nfavourite = 3\n[bus]\ninsecure = true\n'
    )
    assert cli.main(["node", "--config", str(path)]) == cli.EXIT_USER_ERROR
    err = _one_line_error(capsys)
    assert "node.favourite" in err
    assert str(path) in err


def test_missing_config_file_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["node", "--config", str(tmp_path / "absent.toml")]) == cli.EXIT_USER_ERROR
    assert "absent.toml" in _one_line_error(capsys)


def test_client_without_keys_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ask", "--card", "x", "why?", "--to", "tcp://127.0.0.1:9"]) == cli.EXIT_USER_ERROR
    assert "--insecure" in _one_line_error(capsys)


def test_unreachable_node_is_a_user_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(roles_client, "CONNECT_TIMEOUT_S", 0.3)
    argv = ["ask", "--card", "x", "why?", "--to", "tcp://127.0.0.1:9", "--insecure"]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    assert "did not answer" in _one_line_error(capsys)


def test_send_of_missing_file_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["send", str(tmp_path / "nope.txt"), "--topic", "kv/x", "--insecure", "--to", "tcp://127.0.0.1:9"]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    assert "nope.txt" in _one_line_error(capsys)


def test_status_formats_peers_and_links() -> None:
    report = {
        "node": "answerer", "roles": ["answerer"], "model": "m", "device": "cpu", "prefill_tps": 812.0,
        "memory": {"available": 2_000_000_000, "total": 4_000_000_000, "rss": 500_000_000},
        "store": {"entries": 2, "bytes": 12_000_000, "budget": 500_000_000, "pinned": 0},
        "peers": [
            {"node": "reader", "roles": ["reader"], "age_s": 0.4, "bandwidth_bps": 2.5e6, "samples": 3,
             "rtt_s": 0.002, "info": {"headroom": 1e9, "prefill_tps": 700.0,
                                       "budget": {"bits": 4, "keep": 1.0, "layers": 1.0}}},
        ],
    }  # fmt: skip
    text = roles_client.format_status(report)
    assert "answerer [answerer]" in text
    assert "store: 2 cards" in text
    assert "peer reader [reader]" in text
    assert "link 2.5 MB/s" in text
    assert "budget 4-bit keep 1.0 layers 1.0" in text


def test_bench_quality_with_two_models_runs_the_cross_model_bench(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from tests.qkv.test_crossmodel import SENTENCES, _write_rows, build_tiny_gemma_dir

    gemma_dir = build_tiny_gemma_dir(tmp_path / "gemma")
    scored = _write_rows(tmp_path / "scored.jsonl", list(SENTENCES[:1]))
    calib = _write_rows(tmp_path / "calib.jsonl", list(SENTENCES))
    out = tmp_path / "out.json"
    argv = ["bench", "quality", "--sender", str(tiny_model_dir), "--receiver", str(gemma_dir),
            "--data", str(scored), "--limit", "1", "--calib-data", str(calib), "--calib-rows", "8",
            "--calib-offset", "0", "--max-new-tokens", "2", "--bits", "3", "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    summary = json.loads(out.read_text())
    assert summary["card_budget"]["bits"] == 3
    assert summary["calibration_texts"] == 8
    assert {r["condition"] for r in summary["results"]} >= {"no-context", "text", "translated-kv"}
    capsys.readouterr()
    same = ["bench", "quality", "--sender", str(tiny_model_dir), "--receiver", str(tiny_model_dir),
            "--data", str(scored)]  # fmt: skip
    assert cli.main(same) == 2
    assert "two different models" in capsys.readouterr().err


def test_the_handoff_bench_takes_a_card_budget_by_condition() -> None:
    from nodes.bench.handoff import HandoffBenchConfig, card_budget

    assert card_budget(HandoffBenchConfig(bits=3, group_size=64)) == {"bits": 3, "group_size": 64}
    adaptive = card_budget(HandoffBenchConfig(condition="adaptive-3"))
    assert (adaptive["adaptive"], adaptive["bits"], adaptive["keep"]) == (True, 4.0, 1.0)
    with pytest.raises(ValueError, match="whole-card"):
        card_budget(HandoffBenchConfig(condition="uniform-4+evict-0.5"))
