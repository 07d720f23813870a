"""`dsv3 plot WORKDIR`: PNG plots of loss, MaxVio and throughput from metrics.jsonl."""

from __future__ import annotations

import json
import pathlib


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl (FileNotFoundError / ValueError naming the file)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {workdir}")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e})") from None
    if not rows:
        raise ValueError(f"{path} holds no metrics")
    return rows


def plot_run(workdir: str | pathlib.Path) -> list[pathlib.Path]:
    """Write loss.png, max_vio.png and throughput.png into WORKDIR; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    steps = [r["step"] for r in rows]
    panels = {
        "loss.png": [("loss", "total"), ("ce", "cross-entropy"), ("mtp_loss", "MTP")],
        "max_vio.png": [("max_vio", "MaxVio (mean over MoE layers)")],
        "throughput.png": [("tokens_per_s", "tokens/s")],
    }
    out = []
    for name, series in panels.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in series:
            if key in rows[0]:
                ax.plot(steps, [r[key] for r in rows], label=label)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
        path = pathlib.Path(workdir) / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    return out
