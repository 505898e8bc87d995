"""Line plots as PNG files for the bench (B10's rows and bytes over time).

matplotlib (the ``bench`` extra) draws them; without it a plain PNG is written by hand
(one panel per series, scaled to its own range, no text) so a run never fails for
want of a plotting library.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

__all__ = ["save_plot"]

Series = dict[str, Sequence[tuple[float, float]]]


def save_plot(path: Path, title: str, series: Series, *, xlabel: str = "seconds") -> Path:
    """Draw each series (name -> [(x, y)]) in its own panel; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _write_png(path, series)
        return path
    fig, axes = plt.subplots(len(series), 1, figsize=(8, 2.2 * len(series)), sharex=True)
    if len(series) == 1:
        axes = [axes]
    for ax, (name, points) in zip(axes, series.items(), strict=True):
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.5)
        ax.set_ylabel(name)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[-1].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _write_png(path: Path, series: Series, width: int = 600, panel: int = 120) -> None:
    height = panel * max(1, len(series))
    pixels = [[255] * width for _ in range(height)]
    for index, points in enumerate(series.values()):
        top = index * panel
        for x in range(width):
            pixels[top + panel - 1][x] = 160  # axis
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1, y1 = min(xs), max(xs) or 1.0, max(ys) or 1.0
        span = (x1 - x0) or 1.0
        for x, y in points:
            px = int((x - x0) / span * (width - 1))
            py = top + panel - 2 - int(y / y1 * (panel - 4))
            for dy in (0, 1):
                pixels[min(py + dy, height - 1)][px] = 0
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
    path.write_bytes(png + chunk(b"IEND", b""))
