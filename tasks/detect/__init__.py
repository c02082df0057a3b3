"""Poison detectors. Importing this package registers every detector in ``DETECTORS``."""

from tasks.detect import (activation_clustering, confident_learning, influence, knn, loss, scan,  # noqa: F401
                          spectral, spectre)
from tasks.detect.base import DETECTORS, Detection, DetectionContext, flag_top, serial_map

__all__ = ["DETECTORS", "Detection", "DetectionContext", "flag_top", "serial_map"]
