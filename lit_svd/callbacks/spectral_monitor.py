"""`SpectralMonitor`: log singular-value drift, orthonormality and weight change of every adapter."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from lit_svd.inject import adapter_layers
from lit_svd.spectral import LayerSpectrum, layer_position, layer_spectra

__all__ = ["SpectralMonitor", "drift_heatmap", "write_images"]


def drift_heatmap(spectra: dict[str, LayerSpectrum]):
    """A matplotlib figure: decoder layers (rows) × module names (columns), colour = singular-value drift."""
    # The object API, not pyplot: no global backend switch and no figure registry to leak into.
    from matplotlib.figure import Figure

    positions = {name: layer_position(name) for name in spectra}
    rows = sorted({p[0] for p in positions.values()})
    cols = list(dict.fromkeys(p[1] for p in positions.values()))
    grid = torch.full((len(rows), len(cols)), float("nan"))
    for name, (row, col) in positions.items():
        grid[rows.index(row), cols.index(col)] = spectra[name].sv_drift
    fig = Figure(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.22 * len(rows)))
    ax = fig.subplots()
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel("module")
    ax.set_ylabel("decoder layer")
    ax.set_title("singular-value drift ‖S_t − S_0‖/‖S_0‖")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def write_images(writer: Any, spectra: dict[str, LayerSpectrum], step: int | None = None) -> None:
    """Write the histogram ``spectral/singular_values`` and the image ``spectral/drift_heatmap`` of ``spectra``
    to a TensorBoard ``SummaryWriter``."""
    writer.add_histogram("spectral/singular_values", torch.cat([s.singular_values for s in spectra.values()]), step)
    writer.add_figure("spectral/drift_heatmap", drift_heatmap(spectra), step)


class SpectralMonitor(Callback):
    """Every ``every_n_steps`` optimizer steps, measure each adapter's spectrum and log it.

    Scalars ``spectral/{sv_drift,orth_U,orth_V,weight_change}_{mean,max}`` and, for methods that train
    per-dimension vectors, ``spectral/<vector>_drift_{mean,max}`` (DoRA ``magnitude``, VeRA ``lambda_d`` and
    ``lambda_b``, OSoRA ``output_scale``; see ``LayerSpectrum.vector_drift``); with a TensorBoard logger also
    a histogram ``spectral/singular_values`` and the image ``spectral/drift_heatmap`` (decoder layer ×
    module). All metrics come from the r-dimensional factors, batched over layers of equal shape with one
    device→host transfer per measurement (see ``lit_svd.spectral.layer_spectra``).

    Example::

        trainer = Trainer(callbacks=[SVDInit(), SpectralMonitor(every_n_steps=50)])

    Rendering the heat-map costs more than measuring (≈ 0.1 s of matplotlib on the CPU), so images are
    written less often than scalars: every ``images_every_n_steps`` and once more at the end of training,
    so the last image always shows the final state.

    Args:
        every_n_steps: Interval in optimizer steps (also measured after the first optimizer step).
        log_per_layer: Also log one scalar per layer and metric (``spectral/<layer>/<metric>``).
        log_images: Log the heat-map image and the histogram (TensorBoard only).
        images_every_n_steps: Interval of the images, a multiple of ``every_n_steps`` (default: 10 ×).
    """

    METRICS = ("sv_drift", "orth_U", "orth_V", "weight_change")

    def __init__(
        self,
        every_n_steps: int = 50,
        log_per_layer: bool = False,
        log_images: bool = True,
        images_every_n_steps: int | None = None,
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if images_every_n_steps is None:
            images_every_n_steps = 10 * every_n_steps
        if (
            not isinstance(images_every_n_steps, int)
            or images_every_n_steps < 1
            or images_every_n_steps % every_n_steps
        ):
            raise ValueError(
                f"images_every_n_steps must be a positive multiple of every_n_steps={every_n_steps}, "
                f"got {images_every_n_steps!r}"
            )
        self.every_n_steps = every_n_steps
        self.images_every_n_steps = images_every_n_steps
        self.log_per_layer = log_per_layer
        self.log_images = log_images
        self._weight_norms: dict[str, float] = {}
        self._initial_singular_values: dict[str, torch.Tensor] = {}
        self._last_step = -1
        self.last_spectra: dict[str, LayerSpectrum] = {}

    def measure(self, pl_module: LightningModule) -> dict[str, LayerSpectrum]:
        """Spectra of every adapter of ``pl_module`` now.

        ``‖W_0‖_F`` and ``S_0`` of each layer never change, so they are measured on the first call of a
        run only (the first call is the one that reads the m×n weights) and cached.
        """
        return layer_spectra(dict(adapter_layers(pl_module)), self._weight_norms, self._initial_singular_values)

    @override
    def state_dict(self) -> dict[str, Any]:
        # The two per-run constants travel with checkpoints, so a resumed run measures drift against the
        # same S_0 and, under FSDP, never gathers a base weight to re-measure ‖W_0‖ (no SVDInit runs then).
        return {
            "weight_norms": dict(self._weight_norms),
            "initial_singular_values": {k: v.cpu() for k, v in self._initial_singular_values.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._weight_norms.update(state_dict.get("weight_norms", {}))
        self._initial_singular_values.update(state_dict.get("initial_singular_values", {}))

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # ‖W_0‖_F is the only metric input that reads the m×n weights; SVDInit measured it while each weight
        # was whole (under FSDP, before sharding), so take it from there instead of gathering weights.
        from lit_svd.callbacks.svd_init import SVDInit

        report = next((cb.report for cb in trainer.callbacks if isinstance(cb, SVDInit) and cb.report), None)
        norms = (report or {}).get("weight_norms", {})
        for name, layer in adapter_layers(pl_module):
            if layer.layer_name in norms:
                self._weight_norms.setdefault(name, norms[layer.layer_name])

    def _images_due(self, step: int) -> bool:
        return step % self.images_every_n_steps == 0 or step == 1

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or (step % self.every_n_steps != 0 and step != 1):
            return
        self._log(trainer, pl_module, images=self._images_due(step))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The final state always gets an image. Lightning forbids self.log in on_train_end, so scalars of
        # a final measurement go to the loggers directly.
        step = trainer.global_step
        if step == 0:
            return
        if step != self._last_step:
            self._last_step = step
            self.last_spectra = self.measure(pl_module)
            if self.last_spectra:
                metrics = {key: value.item() for key, value in self._summaries(self.last_spectra).items()}
                for logger in trainer.loggers:
                    # Lightning writes what is logged after optimizer step k at step k − 1; so do we.
                    logger.log_metrics(metrics, step=step - 1)
        elif self._images_due(step):
            return  # the in-loop measurement of this step already wrote its images
        self._log_images(trainer, self.last_spectra, step)

    def _summaries(self, spectra: dict[str, LayerSpectrum]) -> dict[str, torch.Tensor]:
        summaries = {}
        for metric in self.METRICS:
            values = torch.tensor([getattr(s, metric) for s in spectra.values()])
            summaries[f"spectral/{metric}_mean"] = values.mean()
            summaries[f"spectral/{metric}_max"] = values.max()
            if self.log_per_layer:
                for name, spectrum in spectra.items():
                    summaries[f"spectral/{name}/{metric}"] = torch.tensor(getattr(spectrum, metric))
        # Trained per-dimension vectors (DoRA's magnitude, VeRA's lambda_d/lambda_b, OSoRA's output_scale).
        for vector in dict.fromkeys(v for s in spectra.values() for v in s.vector_drift):
            drifts = {name: s.vector_drift[vector] for name, s in spectra.items() if vector in s.vector_drift}
            values = torch.tensor(list(drifts.values()))
            summaries[f"spectral/{vector}_drift_mean"] = values.mean()
            summaries[f"spectral/{vector}_drift_max"] = values.max()
            if self.log_per_layer:
                for name, drift in drifts.items():
                    summaries[f"spectral/{name}/{vector}_drift"] = torch.tensor(drift)
        return summaries

    def _log(self, trainer: Trainer, pl_module: LightningModule, images: bool) -> None:
        step = trainer.global_step
        self._last_step = step
        spectra = self.measure(pl_module)
        self.last_spectra = spectra
        if not spectra:
            return
        for key, value in self._summaries(spectra).items():
            pl_module.log(key, value)
        if images:
            self._log_images(trainer, spectra, step)

    def _log_images(self, trainer: Trainer, spectra: dict[str, LayerSpectrum], step: int) -> None:
        if not (self.log_images and spectra and trainer.is_global_zero):
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                write_images(logger.experiment, spectra, step)
