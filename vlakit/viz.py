"""Pictures of what a token pruner kept (needs matplotlib: ``pip install vlakit-blocks[viz]``).

```python
from vlakit.viz import plot_kept_patches

model.predict_action(batch)                      # any model with a pruner
fig = plot_kept_patches(images[0], model.pruner.last_kept[0])   # one example, every view
fig.savefig("kept.png")
```
"""

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

try:
    from matplotlib.figure import Figure  # no pyplot: no backend or global state touched
    from matplotlib.patches import Rectangle
except ImportError as error:  # pragma: no cover - the viz extra is missing
    raise ImportError(
        "vlakit.viz draws with matplotlib: pip install 'vlakit-blocks[viz]' (or matplotlib)"
    ) from error

__all__ = ["plot_kept_patches"]


def _as_hwc(image) -> np.ndarray:
    """One image (PIL, numpy ``[h, w, c]`` or ``[h, w]``, tensor ``[c, h, w]``) as float
    ``[h, w, 3]`` in ``[0, 1]``."""
    if isinstance(image, Tensor):
        array = image.detach().cpu()
        if array.dim() == 3 and array.shape[0] in (1, 3):
            array = array.permute(1, 2, 0)
        array = array.numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array.astype(np.float32)
    if array.max() > 1.0:
        array = array / 255.0
    return np.clip(array, 0.0, 1.0)


def _views(images) -> list:
    if isinstance(images, Tensor) and images.dim() == 4:
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def plot_kept_patches(
    images: Any,
    kept: Tensor,
    grid: tuple[int, int] | None = None,
    titles: list[str] | None = None,
    dim: float = 0.25,
) -> Figure:
    """One panel per view: the image with the dropped patches dimmed and the kept ones
    outlined; each title gives the kept count.

    Args:
        images: the views of one example, as shown to a person (not normalised): a tensor
            ``[v, c, h, w]`` or ``[c, h, w]`` (float in ``[0, 1]`` or ``uint8``), numpy
            arrays or PIL images, or a list of them.
        kept: ``[v * p]`` booleans, which image tokens were kept (a pruner's
            ``last_kept[row]``), views in order.
        grid: patches per view as ``(rows, columns)``; default a square grid.
        titles: one title prefix per view (default ``"view i"``).
        dim: brightness left to dropped patches.

    Returns:
        the matplotlib ``Figure``.
    """
    views = [_as_hwc(v) for v in _views(images)]
    kept = torch.as_tensor(kept).detach().cpu().bool().flatten()
    if kept.numel() % len(views):
        raise ValueError(
            f"kept has {kept.numel()} entries, which does not split into {len(views)} views"
        )
    per_view = kept.numel() // len(views)
    if grid is None:
        side = math.isqrt(per_view)
        if side * side != per_view:
            raise ValueError(
                f"{per_view} patches per view is not a square grid; pass grid=(rows, columns)"
            )
        grid = (side, side)
    rows, cols = grid
    if rows * cols != per_view:
        raise ValueError(f"grid {grid} has {rows * cols} patches, but a view has {per_view}")
    fig = Figure(figsize=(3.2 * len(views), 3.4))
    axes = fig.subplots(1, len(views), squeeze=False)
    for i, (ax, image) in enumerate(zip(axes[0], views)):
        mask = kept[i * per_view:(i + 1) * per_view].view(rows, cols).numpy()
        h, w = image.shape[:2]
        ph, pw = h / rows, w / cols
        shade = mask[np.arange(h) * rows // h][:, np.arange(w) * cols // w]  # [h, w]
        ax.imshow(image * (dim + (1 - dim) * shade[..., None]))
        for r, c in zip(*np.nonzero(mask)):
            ax.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False,
                                   edgecolor="yellow", linewidth=0.8))
        name = titles[i] if titles else f"view {i}"
        ax.set_title(f"{name}: {int(mask.sum())}/{per_view} kept")
        ax.axis("off")
    fig.tight_layout()
    return fig
