"""`dsv3 plot`: PNG files from metrics.jsonl, clear errors for a missing or broken file."""

import json

import pytest

from dsv3_jax.cli import main
from dsv3_jax.train.plot import plot_run


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_writes_pngs(tmp_path):
    rows = [{"step": i, "loss": 5 - i * 0.1, "ce": 4 - i * 0.1, "mtp_loss": 4.2, "max_vio": 0.5 / i,
             "tokens_per_s": 1000 + i} for i in range(1, 20)]
    _write(tmp_path / "metrics.jsonl", rows)
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "max_vio.png", "throughput.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path)]) == 0


def test_plot_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        plot_run(tmp_path)
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
