"""Pictures a person would rather look at than read: training curves, cluster sizes, cluster grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .io import atomic_path
from .paths import cluster_png


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def training_curves(history: list[dict], path: Path) -> Path:
    """Loss, NMI(t-1, t) and (with labels) NMI against labels, per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_nmi) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="pseudo-label loss", title="training loss")
    for key, name in (("nmi_prev", "NMI(t-1, t)"), ("nmi_labels", "NMI vs labels")):
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if points:
            ax_nmi.plot(*zip(*points), marker="o", label=name)
    ax_nmi.set(xlabel="epoch", ylabel="NMI", title="cluster stability", ylim=(0, 1))
    ax_nmi.legend(loc="lower right")
    return _save(fig, path)


def cluster_size_histogram(assignments: np.ndarray, k: int, path: Path) -> Path:
    plt = _pyplot()
    sizes = np.sort(np.bincount(assignments, minlength=k))[::-1]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(np.arange(k), sizes, width=1.0)
    ax.axhline(len(assignments) / k, color="k", linestyle="--", linewidth=1, label="uniform")
    ax.set(xlabel="clusters, largest first", ylabel="images", title=f"cluster sizes (k={k})")
    ax.legend()
    return _save(fig, path)


def _to_pil(chw: np.ndarray, scale: int) -> Image.Image:
    img = Image.fromarray(np.ascontiguousarray(np.transpose(chw, (1, 2, 0))))
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def image_grid(
    images: np.ndarray, columns: int, scale: int, caption: str | None = None
) -> Image.Image:
    """Tile uint8 CHW images into one picture, optionally under a caption line."""
    side = images.shape[-1] * scale
    rows = max(1, -(-len(images) // columns))
    top = 14 if caption else 0
    canvas = Image.new("RGB", (columns * (side + 2), rows * (side + 2) + top), "white")
    for i, chw in enumerate(images):
        r, c = divmod(i, columns)
        canvas.paste(_to_pil(chw, scale), (c * (side + 2), top + r * (side + 2)))
    if caption:
        ImageDraw.Draw(canvas).text((2, 1), caption, fill="black")
    return canvas


def _upscale(side: int) -> int:
    return max(1, 48 // side)


def central_members(
    assignments: np.ndarray, distances: np.ndarray, cluster: int, n: int
) -> np.ndarray:
    """Indices of up to n members of a cluster, closest to its centroid first."""
    members = np.flatnonzero(assignments == cluster)
    return members[np.argsort(distances[members], kind="stable")][:n]


def cluster_grids(
    images: np.ndarray,
    assignments: np.ndarray,
    distances: np.ndarray,
    out_dir: Path,
    per_cluster: int,
) -> list[Path]:
    """One picture per non-empty cluster: its images closest to the centroid first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = _upscale(images.shape[-1])
    paths = []
    for cluster in np.unique(assignments):
        members = central_members(assignments, distances, cluster, per_cluster)
        grid = image_grid(images[members], 8, scale)
        path = cluster_png(out_dir, cluster)
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        paths.append(path)
    return paths


def clusters_overview(
    images: np.ndarray,
    assignments: np.ndarray,
    distances: np.ndarray,
    path: Path,
    n_clusters: int,
    per_cluster: int,
) -> Path:
    """The largest clusters, one row each, most central images first."""
    sizes = np.bincount(assignments)
    largest = np.argsort(-sizes, kind="stable")[:n_clusters]
    largest = largest[sizes[largest] > 0]
    scale = _upscale(images.shape[-1])
    rows = []
    for cluster in largest:
        members = central_members(assignments, distances, cluster, per_cluster)
        caption = f"cluster {cluster}: {sizes[cluster]} images"
        rows.append(image_grid(images[members], per_cluster, scale, caption))
    width = max(r.width for r in rows)
    canvas = Image.new("RGB", (width, sum(r.height + 4 for r in rows)), "white")
    y = 0
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height + 4
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
