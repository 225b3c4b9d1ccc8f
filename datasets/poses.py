"""Right-angle turns and mirrors in a test set (datasets/shift.py's measure): a pose classifier trained on the
training images in their 8 square poses, its predictions on the test images unmixed through its own confusion
matrix on held-out training images (corrupted as the test set is, so noise does not read as a pose). Usage:
    poses = measure_poses(train_images, test_images, apply)   # {"pose_accuracy", "turned", "mirrored", "poses"}
"""
import cv2
import numpy as np
from scipy.optimize import nnls
from sklearn.linear_model import LogisticRegression

POSE_SIDE = 16     # px, the pose classifier's input (grey, standardized)


def _d4(gray: np.ndarray) -> list[np.ndarray]:
    """The 8 square poses: k quarter turns of the image, then of its mirror (index 4 f + k)."""
    return [np.rot90(np.fliplr(gray) if f else gray, k) for f in (0, 1) for k in range(4)]


def _pose_features(rgb: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (POSE_SIDE, POSE_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)


def _standardize(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1)
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)


def measure_poses(train_images: list, test_images: list, apply, seed: int = 0) -> dict:
    """Share of test images turned by a right angle and mirrored, from a logistic-regression pose classifier
    trained on half the training images in all 8 poses (corrupted by the measured photometric operations),
    its confusion matrix on the other half, and its predictions on the test images unmixed through it.
    apply(image, seed): the image as the test set's measured photometric operations would leave it."""
    corrupted = [apply(img, seed + i) for i, img in enumerate(train_images)]
    half = len(corrupted) // 2
    fit_part, held_part = corrupted[:half], corrupted[half:]
    pose_x = lambda imgs: _standardize(np.stack([p for img in imgs for p in _d4(_pose_features(img))]))
    pose_y = lambda imgs: np.tile(np.arange(8), len(imgs))
    clf = LogisticRegression(C=0.5, max_iter=300).fit(pose_x(fit_part), pose_y(fit_part))
    pred = clf.predict(pose_x(held_part)).reshape(-1, 8)  # row: image, column: its true pose
    confusion = np.stack([np.bincount(pred[:, t], minlength=8) / len(pred) for t in range(8)])  # P(pred | true)
    accuracy = float(np.trace(confusion) / 8)
    observed = np.bincount(clf.predict(_standardize(np.stack([_pose_features(t) for t in test_images]))),
                           minlength=8) / len(test_images)
    mix, _ = nnls(confusion.T, observed)
    mix = mix / (mix.sum() or 1)
    turned = float(1 - mix[0] - mix[4])  # any quarter turn (of the image or its mirror)
    mirrored = float(mix[4:].sum())
    return {"pose_accuracy": accuracy, "turned": turned, "mirrored": mirrored,
            "poses": [round(float(m), 3) for m in mix]}
