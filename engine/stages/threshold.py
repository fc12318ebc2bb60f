"""Global threshold search (method.md §2.9): the threshold whose mask boundary lies darkest.

For each t of a scanned set, the 1-voxel inner shell of ``{P > t}`` is taken and the mean raw
intensity over it computed; membranes are dark, so the shell that sits on the vesicle membranes has
the lowest mean. All thresholds are evaluated in one pass over the volume (`cryoves.kernels.shell`).
"""

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from cryoves.engine.errors import CryovesError
from cryoves.engine.network.rescale import resample_at
from cryoves.kernels.shell import shell_sums_at, shell_voxels


@dataclass(frozen=True, kw_only=True)
class ThresholdParams:
    """Global threshold: scan ``lo, lo + step, ...`` below ``hi`` (excluded), or use ``threshold`` as given."""

    lo: float = 0.80
    hi: float = 1.0  # excluded
    step: float = 0.01  # a finer scan near 1 is allowed (method.md §2.9); must be validated
    threshold: float | None = None  # user-given: used directly, no search

    def __post_init__(self) -> None:
        for name in ("lo", "hi", "step"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise CryovesError(f"threshold {name} must be a finite number, got {value!r}")
        if not 0.0 <= self.lo < self.hi <= 1.0:
            raise CryovesError(
                f"threshold range must satisfy 0 <= lo < hi <= 1, got lo={self.lo}, hi={self.hi}"
            )
        if self.step <= 0:
            raise CryovesError(f"threshold step must be > 0, got {self.step}")
        if (self.hi - self.lo) / self.step > 1_000_000:
            raise CryovesError(
                f"threshold step {self.step} gives more than 1,000,000 thresholds in "
                f"[{self.lo}, {self.hi}); use a larger step"
            )
        if self.threshold is not None:
            t = self.threshold
            if not _is_number(t) or not 0.0 <= t < 1.0:
                raise CryovesError(f"threshold must be a number in [0, 1), got {t!r}")

    def thresholds(self) -> np.ndarray:
        """The scanned thresholds, ascending, rounded to 12 decimals so 0.8 + 3 * 0.01 is 0.83 exactly."""
        n = math.ceil((self.hi - self.lo) / self.step - 1e-9)
        values = np.round(self.lo + self.step * np.arange(n), 12)
        return values[values < self.hi]


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare fields yourself
class ThresholdResult:
    """The chosen threshold and, when searched, the curve it was chosen from."""

    threshold: float
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0))  # scanned, ascending
    mean_intensity: np.ndarray = field(default_factory=lambda: np.zeros(0))  # NaN where the shell is empty
    n_shell_vox: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    searched: bool = False


def global_threshold(tomogram: np.ndarray, probability: np.ndarray,
                     params: ThresholdParams) -> ThresholdResult:
    """Choose t* = argmin over t of the mean tomogram intensity on the inner shell of ``{P > t}``.

    ``tomogram`` lies on the probability's grid or a finer one over the same field of view: it is resampled to the
    probability's grid (`resample_to_shape`) only at the shells' voxels, the only ones read.
    Ties go to the first (lowest) threshold; thresholds with an empty shell are ignored. If every
    shell is empty, the returned threshold has nothing above it (an empty result, not an error).
    """
    if params.threshold is not None:
        return ThresholdResult(threshold=float(params.threshold))
    tomogram = np.asarray(tomogram)
    probability = np.asarray(probability)
    if probability.ndim != 3:
        raise CryovesError(f"probability map must be 3-D (z, y, x), got shape {probability.shape}")
    if tomogram.ndim != 3 or any(n < m for n, m in zip(tomogram.shape, probability.shape)):
        raise CryovesError(
            f"tomogram shape {tomogram.shape} is coarser than the probability map's {probability.shape}; "
            "the map must lie on the tomogram's grid or a coarser one"
        )
    thresholds = params.thresholds()
    shells = shell_voxels(probability, thresholds)
    sums, counts = shell_sums_at(resample_at(tomogram, probability.shape, shells), shells, probability, thresholds)
    mean = np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)
    if np.any(counts > 0):
        chosen = float(thresholds[np.nanargmin(mean)])  # nanargmin returns the first minimum
    else:
        chosen = _nothing_above(probability, thresholds)
    return ThresholdResult(threshold=chosen, thresholds=thresholds, mean_intensity=mean,
                           n_shell_vox=counts, searched=True)


def _nothing_above(probability: np.ndarray, thresholds: np.ndarray) -> float:
    """A threshold with no voxel above it: the map maximum if it exceeds every scanned threshold."""
    p_max = float(np.fmax.reduce(probability, axis=None)) if probability.size else -np.inf
    last = float(thresholds[-1]) if thresholds.size else 0.0
    return p_max if p_max > last else last


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
