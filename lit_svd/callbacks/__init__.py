"""Lightning callbacks: one-time SVD initialisation and spectral monitoring."""

from lit_svd.callbacks.spectral_monitor import SpectralMonitor, drift_heatmap
from lit_svd.callbacks.svd_init import SVDInit, adapter_checksum

__all__ = ["SVDInit", "SpectralMonitor", "adapter_checksum", "drift_heatmap"]
