"""Poison detectors. Importing this package registers every detector in ``DETECTORS``."""

from poisonsweep.tasks.detect import (abl, activation_clustering, confident_learning, influence, knn, loss,  # noqa: F401
                          scan, spectral, spectre)
from poisonsweep.tasks.detect.base import DETECTORS, Detection, DetectionContext, flag_top, serial_map

__all__ = ["DETECTORS", "Detection", "DetectionContext", "flag_top", "serial_map"]
