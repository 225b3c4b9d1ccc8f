"""Per-image appearance statistics on HxW grey (or HxWx3 RGB) uint8 arrays: pure numpy/OpenCV.

Usage: noise_sigma(gray), dominant_orientation(gray), sharpness(gray), colour_cast(rgb)
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


def colour_cast(rgb: np.ndarray) -> float:
    """Spread of the three channel means in grey levels: 0 for a grey image, larger for a tinted one."""
    return float(rgb.reshape(-1, 3).mean(0).std())
