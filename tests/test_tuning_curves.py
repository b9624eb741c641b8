"""The demo's loss-curve picture: a PNG with one panel per phase."""
from __future__ import annotations

from tuning.curves import plot_curves, smooth


def test_smooth_is_a_trailing_mean():
    assert smooth([4.0, 2.0, 6.0, 0.0], window=2) == [4.0, 3.0, 4.0, 3.0]


def test_plot_curves_writes_a_png(tmp_path):
    run = {"losses": [5.0, 4.0, 3.5, 3.0], "evals": [{"step": 0, "loss": 5.5}, {"step": 4, "loss": 4.2}]}
    path = plot_curves([("a", {"full": run}), ("b", {"lora": run, "state": {"losses": [3.0, 2.9]}})],
                       tmp_path / "c.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a real picture, two panels
