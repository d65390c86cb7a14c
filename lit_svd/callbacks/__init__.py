"""Lightning callbacks: one-time SVD initialisation, spectral monitoring, checkpointing and the end-of-run summary."""

from lit_svd.callbacks.checkpoint import AdapterCheckpoint, reopen_cut_epoch
from lit_svd.callbacks.run_summary import ParameterSummary, RunSummary, wilson_interval
from lit_svd.callbacks.spectral_monitor import SpectralMonitor, drift_heatmap
from lit_svd.callbacks.svd_init import SVDInit, adapter_checksum

__all__ = [
    "AdapterCheckpoint",
    "ParameterSummary",
    "RunSummary",
    "SVDInit",
    "SpectralMonitor",
    "adapter_checksum",
    "drift_heatmap",
    "reopen_cut_epoch",
    "wilson_interval",
]
