"""Render a run's TensorBoard log into one PNG: loss curves next to the latest spectral heat-map.

python -m lit_svd.report runs/gsm8k_sorsa/version_0 --out docs/images/sorsa_run.png
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

__all__ = ["render_run"]


def render_run(log_dir: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Write ``out`` (PNG) with ``train/loss`` (and ``val/loss``) curves and the last drift heat-map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    if "train/loss" not in tags["scalars"]:
        raise ValueError(f"no train/loss scalars in {log_dir}; is this a lit_svd TensorBoard log directory?")
    has_heatmap = "spectral/drift_heatmap" in tags["images"]
    fig, axes = plt.subplots(1, 2 if has_heatmap else 1, figsize=(13 if has_heatmap else 6, 4.8), squeeze=False)
    loss_ax = axes[0, 0]
    for tag in ("train/loss", "val/loss"):
        if tag in tags["scalars"]:
            points = events.Scalars(tag)
            loss_ax.plot(
                [p.step for p in points],
                [p.value for p in points],
                marker="." if tag == "val/loss" else None,
                label=tag,
            )
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    if has_heatmap:
        last = events.Images("spectral/drift_heatmap")[-1]
        axes[0, 1].imshow(mpimg.imread(io.BytesIO(last.encoded_image_string), format="png"))
        axes[0, 1].set_title(f"spectral/drift_heatmap at step {last.step}")
        axes[0, 1].axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", help="TensorBoard version directory of a run")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    print(render_run(args.log_dir, args.out, args.title))


if __name__ == "__main__":
    main()
