"""Blur kernels of the Real-ESRGAN degradation (Wang et al. 2021): Gaussian, generalized
Gaussian and plateau (isotropic or rotated), and the circular low-pass (2-D sinc) filter."""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import special

from tsdsr_jax.checks import in_range, interval, probabilities

KINDS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def grid(size: int) -> np.ndarray:
    """(size, size, 2) integer offsets (x, y) from the centre of an odd-sized kernel."""
    ax = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx, yy], axis=-1)


def covariance(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """The 2×2 covariance with deviations ``sigma_x``, ``sigma_y``, rotated by ``theta``."""
    c, s = np.cos(theta), np.sin(theta)
    rotation = np.array([[c, -s], [s, c]])
    return rotation @ np.diag([sigma_x ** 2, sigma_y ** 2]) @ rotation.T


def _mahalanobis(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    g = grid(size)
    return np.einsum("hwi,ij,hwj->hw", g, np.linalg.inv(covariance(sigma_x, sigma_y, theta)), g)


def gaussian(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Normalised (anisotropic) Gaussian kernel."""
    k = np.exp(-0.5 * _mahalanobis(size, sigma_x, sigma_y, theta))
    return k / k.sum()


def generalized_gaussian(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
                         ) -> np.ndarray:
    """Normalised generalized Gaussian ``exp(-½ q^β)`` (q the squared Mahalanobis distance)."""
    k = np.exp(-0.5 * np.power(_mahalanobis(size, sigma_x, sigma_y, theta), beta))
    return k / k.sum()


def plateau(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """Normalised plateau kernel ``1 / (q^β + 1)``."""
    k = 1.0 / (np.power(_mahalanobis(size, sigma_x, sigma_y, theta), beta) + 1.0)
    return k / k.sum()


def sinc(cutoff: float, size: int, pad_to: int = 0) -> np.ndarray:
    """Normalised circular low-pass kernel with angular cutoff ``cutoff`` (rad/pixel),
    zero-padded to ``pad_to`` when that is larger."""
    r = np.hypot(*np.moveaxis(grid(size), -1, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    k[size // 2, size // 2] = cutoff ** 2 / (4 * np.pi)
    k /= k.sum()
    if pad_to > size:
        pad = (pad_to - size) // 2
        k = np.pad(k, pad)
    return k


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How one blur kernel is drawn (Real-ESRGAN's first-stage defaults)."""

    sizes: tuple[int, ...] = tuple(range(7, 22, 2))
    kinds: tuple[str, ...] = KINDS
    probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sigma: tuple[float, float] = (0.2, 3.0)
    betag: tuple[float, float] = (0.5, 4.0)
    betap: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1

    def __post_init__(self):
        odd_sizes(self, "sizes")
        if not set(self.kinds) <= set(KINDS) or len(self.probs) != len(self.kinds):
            raise ValueError(f"kinds={self.kinds!r}: some of {KINDS}, one probability each "
                             f"(probs={self.probs!r})")
        probabilities(self, "probs")
        for name in ("sigma", "betag", "betap"):
            interval(self, name, low=1e-3)
        in_range(self, "sinc_prob", 0, 1)


def odd_sizes(obj: object, name: str) -> None:
    """``obj.name`` is a non-empty tuple of odd kernel sizes from 3 to 21."""
    sizes = getattr(obj, name)
    if not sizes or any(k % 2 == 0 or not 3 <= k <= 21 for k in sizes):
        raise ValueError(f"{name}={sizes!r}: odd kernel sizes from 3 to 21")


def _beta(rng: np.random.Generator, low: float, high: float) -> float:
    """Half the time below 1, half above (as Real-ESRGAN draws shape parameters)."""
    return rng.uniform(low, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, high)


def random_kernel(rng: np.random.Generator, config: KernelConfig, pad_to: int = 21
                  ) -> np.ndarray:
    """A random blur kernel drawn as Real-ESRGAN does, zero-padded to ``pad_to``²."""
    size = int(rng.choice(config.sizes))
    if rng.random() < config.sinc_prob:
        cutoff = rng.uniform(np.pi / 3 if size < 13 else np.pi / 5, np.pi)
        return sinc(cutoff, size, pad_to)
    probs = np.asarray(config.probs) / sum(config.probs)
    kind = config.kinds[rng.choice(len(config.kinds), p=probs)]
    sigma_x = rng.uniform(*config.sigma)
    if kind.endswith("aniso"):
        sigma_y, theta = rng.uniform(*config.sigma), rng.uniform(-np.pi, np.pi)
    else:
        sigma_y, theta = sigma_x, 0.0
    if kind.startswith("generalized"):
        k = generalized_gaussian(size, sigma_x, sigma_y, theta, _beta(rng, *config.betag))
    elif kind.startswith("plateau"):
        k = plateau(size, sigma_x, sigma_y, theta, _beta(rng, *config.betap))
    else:
        k = gaussian(size, sigma_x, sigma_y, theta)
    return np.pad(k, (pad_to - size) // 2)
