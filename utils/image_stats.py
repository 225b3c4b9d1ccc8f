"""Per-image appearance statistics on HxW grey (or HxWx3 RGB) uint8 arrays: pure numpy/OpenCV.

Usage: noise_sigma(gray), dominant_orientation(gray), sharpness(gray), smooth_sharpness(gray), linear_runs(gray),
       colour_cast(rgb), orientation_histogram(gray), jpeg_zeros(gray)
Used by eda.py's train-vs-test table and by the test-matched augmentation (datasets/shift.py).
"""
import cv2
import numpy as np

_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)


def noise_sigma(gray: np.ndarray) -> float:
    """Gaussian noise level in grey levels, Immerkaer's estimate (1996): the image convolved with a
    mask that cancels smooth structure, mean absolute response, scaled."""
    h, w = gray.shape
    if h < 3 or w < 3:
        return 0.0
    response = np.abs(cv2.filter2D(gray.astype(np.float64), -1, _IMMERKAER, borderType=cv2.BORDER_REFLECT)[1:-1, 1:-1])
    return float(np.sqrt(np.pi / 2) * response.sum() / (6 * (w - 2) * (h - 2)))


def dominant_orientation(gray: np.ndarray) -> float:
    """How far, in degrees (0-45), the dominant gradient direction (structure tensor) lies from the nearest
    image axis: about 0 for upright scans and documents, larger for images turned by an odd angle."""
    gx = cv2.Sobel(gray.astype(np.float64), cv2.CV_64F, 1, 0)
    gy = cv2.Sobel(gray.astype(np.float64), cv2.CV_64F, 0, 1)
    angle = np.degrees(0.5 * np.arctan2(2 * (gx * gy).sum(), (gx * gx - gy * gy).sum())) % 90
    return float(min(angle, 90 - angle))


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian: falls with blur (and rises with noise)."""
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def smooth_sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian of the 3x3 median-filtered image over the image's grey variance (+1): falls with
    blur, and, unlike sharpness(), barely moves with Gaussian noise (the median takes out the isolated pixels the
    noise makes and keeps the edges) or with contrast (the ratio)."""
    g = cv2.medianBlur(gray, 3)
    return float(cv2.Laplacian(g, cv2.CV_64F).var() / (float(gray.var()) + 1.0))


def linear_runs(gray: np.ndarray, edge: float = 4.0) -> float:
    """The trace of an upscale by linear interpolation: the share of edge pixels (a step of at least `edge` grey
    levels to the next pixel) whose second difference is at most 1 grey level, along the rows and the columns. An
    image shrunk by a factor s and stretched back is linear between its samples, so about 1 - 2 / s of its pixels
    are; a blur curves every edge. Read at the image's stored resolution (a resize moves the samples); noise hides
    it."""
    shares = []
    for g in (gray, gray.T):
        g = g.astype(np.float32)
        first, second = np.abs(np.diff(g, axis=1))[:, :-1], np.abs(np.diff(g, 2, axis=1))
        on_edge = first >= edge
        shares.append(float((second[on_edge] <= 1.0).mean()) if on_edge.any() else 0.0)
    return float(np.mean(shares))


def colour_cast(rgb: np.ndarray) -> float:
    """Spread of the three channel means in grey levels: 0 for a grey image, larger for a tinted one."""
    return float(rgb.reshape(-1, 3).mean(0).std())


def orientation_histogram(gray: np.ndarray, bins: int = 36) -> np.ndarray:
    """Gradient directions modulo 90 degrees (so right-angle turns leave it unchanged), weighted by gradient
    magnitude, normalized to sum 1: bins of 90 / bins degrees. A rotation by a degrees shifts it circularly."""
    g = gray.astype(np.float32)
    gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)
    weight = np.hypot(gx, gy)
    angle = np.degrees(np.arctan2(gy, gx)) % 90
    hist = np.bincount(np.minimum((angle * bins / 90).astype(int), bins - 1).ravel(), weight.ravel(), bins)
    return hist / (hist.sum() or 1.0)


_k = np.arange(8)
_DCT = np.sqrt(2 / 8) * np.cos(np.pi * (2 * _k[None, :] + 1) * _k[:, None] / 16)  # 8-point DCT-II, orthonormal
_DCT[0] /= np.sqrt(2)
_HIGH = np.add.outer(_k, _k) >= 5  # the high frequencies JPEG quantizes hardest


def jpeg_zeros(gray: np.ndarray) -> float:
    """JPEG's trace: the share of high-frequency DCT coefficients of the 8x8 blocks (from the top left, JPEG's grid)
    that are about 0 (|c| < 1 grey level), over the blocks with some texture (std > 4). JPEG rounds these to
    multiples of large steps, so they come back about 0; an image never compressed has them spread. Read at the
    image's stored resolution; 0 for an image without texture."""
    g = gray.astype(np.float32)
    h, w = (g.shape[0] // 8) * 8, (g.shape[1] // 8) * 8
    if not h or not w:
        return 0.0
    blocks = g[:h, :w].reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 8, 8)
    blocks = blocks[blocks.std((1, 2)) > 4]
    if not len(blocks):
        return 0.0
    coefficients = np.einsum("ij,bjk,lk->bil", _DCT, blocks, _DCT)
    return float((np.abs(coefficients[:, _HIGH]) < 1.0).mean())
