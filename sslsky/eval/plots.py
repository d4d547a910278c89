"""The PNG of ``sslsky search --png``: a grid of colour composites, the query first, then its neighbours."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from sslsky.data.rgb import lupton_rgb
from sslsky.data.schema import RGB_BANDS

#: Pixels of one panel of the neighbour grid (width, height), at PANEL_DPI.
PANEL_DPI = 100
PANEL_INCHES = (1.8, 2.2)


def grid_size(n_panels: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of a neighbour grid of ``n_panels`` panels, ``columns`` per line."""
    cols = min(n_panels, columns)
    rows = math.ceil(n_panels / cols)
    return round(cols * PANEL_INCHES[0] * PANEL_DPI), round(rows * PANEL_INCHES[1] * PANEL_DPI)


def neighbour_grid(images: list[np.ndarray], titles: list[str], bands: str, rgb_bands: str, path: str | os.PathLike,
                   columns: int = 6, stretch: float = 0.5, q: float = 10.0) -> Path:
    """A PNG of colour composites, the query first: ``images`` are ``(C, H, W)`` nanomaggies (Lupton et al. 2004
    composites of ``rgb_bands``, north up), or 8-bit colour images when ``bands`` is "RGB" (shown as they are)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(images), columns)
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_INCHES[0], rows * PANEL_INCHES[1]), dpi=PANEL_DPI,
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, title) in enumerate(zip(images, titles)):
        ax = axes.flat[i]
        if bands == RGB_BANDS:  # a PNG/JPEG cutout: row 0 is the top
            colour = np.clip(np.moveaxis(np.asarray(image), 0, -1), 0, 255).astype(np.uint8)
            ax.imshow(colour, origin="upper", interpolation="nearest")
        else:
            ax.imshow(lupton_rgb(image, bands, rgb_bands, stretch, q), origin="lower", interpolation="nearest")
        ax.set_title(title, fontsize=7, color="crimson" if i == 0 else "black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PANEL_DPI)
    plt.close(fig)
    return path
