"""The decode cache: the same pixels and batches as decoding every epoch, one decode per data and
img_size across runs, bad images named, and cheap to hand to loader workers."""
import pickle

import cv2
import numpy as np
import pytest
import torch

from datasets import ImageDataset, SeededSampler, load_data, load_image, screen_images
from datasets.cache import CachedImages, cache_images
from datasets.files import take
from datasets.transforms import AUGS
from utils import UserError


def batches(items, labels, img_size, workers=0):
    ds = ImageDataset(items, labels, AUGS.build("test_noise", img_size, 1.0, (0.5,) * 3, (0.25,) * 3))
    sampler = SeededSampler(len(labels), seed=3)
    sampler.set_epoch(2)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler, num_workers=workers)
    return [(x, y) for x, y, _ in loader]


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_cached_batches_equal_decoded_batches(competition, tmp_path, mode):
    data = load_data(str(competition))
    images, bad = cache_images(data.items, 24, mode, tmp_path / "c")
    assert bad == {} and len(images) == len(data.items) and images[0].shape == (24, 24, 3)
    for (x1, y1), (x2, y2) in zip(batches(data.items, data.labels, 24), batches(images, data.labels, 24, workers=2)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)  # augmentation included, across worker processes


def test_disk_cache_is_reused_until_a_file_changes(competition, tmp_path):
    data = load_data(str(competition))
    calls = []

    def decode(item):
        calls.append(item)
        return load_image(item)

    first, _ = cache_images(data.items, 20, "disk", tmp_path, decode)
    assert len(calls) == len(data.items) and len(list(tmp_path.glob("*.npy"))) == 1
    second, _ = cache_images(data.items, 20, "disk", tmp_path, decode)
    assert len(calls) == len(data.items) and second.path == first.path  # mapped, not decoded again
    assert np.array_equal(second.array, first.array)
    cache_images(data.items, 28, "disk", tmp_path, decode)  # another img_size: another file
    assert len(list(tmp_path.glob("*.npy"))) == 2
    edited = data.items[5]
    cv2.imwrite(str(edited), np.full((32, 32), 255, np.uint8))
    third, _ = cache_images(data.items, 20, "disk", tmp_path, decode)
    assert third.path != first.path and (third[5] == 255).all() and not (first[5] == 255).all()


def test_subsets_and_pickling(competition, tmp_path):
    data = load_data(str(competition))
    images, _ = cache_images(data.items, 16, "disk", tmp_path)
    part = take(images, np.array([7, 3, 9]))
    assert isinstance(part, CachedImages) and np.array_equal(part[1], images[3])
    assert np.array_equal(take(part, [2])[0], images[9])
    payload = pickle.dumps(part)
    assert len(payload) < 2000  # the path and the index, not the pixels
    assert np.array_equal(pickle.loads(payload)[0], images[7])
    assert take(data.items, [1, 0]) == [data.items[1], data.items[0]]


@pytest.mark.parametrize("mode", ["disk", "ram", "none"])
def test_bad_images_named_through_the_cache(competition, mode):
    (competition / "train" / "tr_0003.png").write_bytes(b"not a png")
    data = load_data(str(competition))
    with pytest.raises(UserError, match=r"1 training image.*tr_0003\.png.*--skip_bad_images True"):
        screen_images(data, skip_bad=False, cache=mode, img_size=24)
    data = load_data(str(competition))
    assert screen_images(data, skip_bad=True, cache=mode, img_size=24) == ["tr_0003.png"]
    assert len(data.items) == len(data.labels) == len(data.ids) == 239
    if mode != "none":
        assert isinstance(data.items, CachedImages) and data.items[0].shape == (24, 24, 3)
        assert isinstance(data.test_items, CachedImages) and len(data.test_items) == 40


def test_auto_cache_is_ram_for_in_memory_data():
    data = load_data("digits")
    screen_images(data, skip_bad=False, cache="auto", img_size=32)
    assert data.items.path is None and data.items[0].shape == (32, 32, 3)
