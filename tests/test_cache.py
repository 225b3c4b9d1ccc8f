"""The decode cache: the same pixels and batches as decoding every epoch, one decode per data and
img_size across runs, bad images named, and cheap to hand to loader workers."""
import os
import pickle
import re
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import run_script
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
    loaded = load_data(str(competition))
    data, skipped = screen_images(loaded, skip_bad=True, cache=mode, img_size=24)
    assert skipped == ["tr_0003.png"] and len(data.items) == len(data.labels) == len(data.ids) == 239
    assert len(loaded.items) == len(loaded.ids) == 240 and isinstance(loaded.items[0], Path)  # left as it was
    if mode != "none":
        assert isinstance(data.items, CachedImages) and data.items[0].shape == (24, 24, 3)
        assert isinstance(data.test_items, CachedImages) and len(data.test_items) == 40


def test_auto_cache_is_ram_for_in_memory_data():
    data, _ = screen_images(load_data("digits"), skip_bad=False, cache="auto", img_size=32)
    assert data.items.path is None and data.items[0].shape == (32, 32, 3)


# --- the bound: least recently used decode caches evicted, held ones kept, one data set over it refused ---

def three_sets(competition):
    items = load_data(str(competition)).items
    return items[:100], items[100:200], items[140:240]  # three image lists: three keys at one img_size


def build(items, cache_dir, **kw) -> Path:
    """The cache's .npy path, nothing held (the CachedImages is dropped at once)."""
    return cache_images(items, 16, "disk", cache_dir, **kw)[0].path


def bound_for(caches: float, path: Path) -> float:
    """--cache_max_gb that holds `caches` caches the size of the one at path."""
    return caches * path.stat().st_size / 1e9


def age(path: Path, seconds: float) -> None:
    os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_least_recently_used_cache_is_evicted_to_stay_under_the_bound(competition, tmp_path, capsys):
    a, b, c = three_sets(competition)
    path_a, path_b = build(a, tmp_path), build(b, tmp_path)
    assert path_a.stat().st_size == 100 * 16 * 16 * 3 + 128  # N x size^2 x 3 bytes and the header: as the README says
    age(path_a, 200), age(path_b, 100)
    path_c = build(c, tmp_path, max_gb=bound_for(2.5, path_a))
    assert not path_a.exists() and path_b.is_file() and path_c.is_file()
    assert not list(tmp_path.glob(f"{path_a.stem}.*"))  # its .bad.json, .json and .lock went with it
    assert re.search(r"evicted 1 least recently used decode cache.*\d+ kB freed", capsys.readouterr().out)
    path_a = build(a, tmp_path, max_gb=bound_for(10, path_b))  # under a larger bound nothing goes
    assert path_b.is_file() and path_c.is_file() and path_a.is_file()


def test_a_reuse_makes_a_cache_recent(competition, tmp_path):
    a, b, c = three_sets(competition)
    path_a, path_b = build(a, tmp_path), build(b, tmp_path)
    age(path_a, 200), age(path_b, 100)
    assert build(a, tmp_path) == path_a  # a reuse: a is now the most recent
    build(c, tmp_path, max_gb=bound_for(2.5, path_a))
    assert path_a.is_file() and not path_b.exists()


def test_a_cache_in_use_is_never_evicted(competition, tmp_path, capsys):
    a, b, c = three_sets(competition)
    held = cache_images(a, 16, "disk", tmp_path)[0][np.arange(10)]  # only a view of it lives: it still holds
    path_b = build(b, tmp_path)
    age(held.path, 200), age(path_b, 100)
    build(c, tmp_path, max_gb=bound_for(2.5, held.path))
    assert held.path.is_file() and not path_b.exists()  # b went although a was older
    path_b = build(b, tmp_path, max_gb=bound_for(1.5, held.path))  # c evicted; a, held, stays over the bound
    assert held.path.is_file() and path_b.is_file() and len(list(tmp_path.glob("*.npy"))) == 2
    assert "over their bound" in capsys.readouterr().out
    del held  # released: now it can go
    build(c, tmp_path, max_gb=bound_for(1.5, path_b))
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_one_data_set_over_the_bound_is_one_error(competition, tmp_path):
    a, b, _ = three_sets(competition)
    path_a = build(a, tmp_path)
    with pytest.raises(UserError, match=r"100 images at 16 px need [\d.]+ kB.*bound of [\d.]+ kB.*"
                                        r"--cache_max_gb 0\.1 or more, --cache ram.* or --cache none"):
        build(b, tmp_path, max_gb=bound_for(0.5, path_a))
    assert path_a.is_file() and [p.name for p in tmp_path.glob("*.npy")] == [path_a.name]  # nothing evicted, no tmp
    data = load_data(str(competition))
    with pytest.raises(UserError, match="240 images at 16 px"):  # screen_images passes the bound on
        screen_images(data, skip_bad=False, cache="disk", img_size=16, cache_dir=tmp_path,
                      cache_max_gb=bound_for(0.5, path_a))


def test_a_mapped_array_stays_readable_after_its_file_is_evicted(competition, tmp_path):
    a, b, _ = three_sets(competition)
    images = cache_images(a, 16, "disk", tmp_path)[0]
    array, path = images.array, images.path
    expected = np.array(array)
    del images  # the hold goes, the mapping stays
    build(b, tmp_path, max_gb=bound_for(1.5, path))
    assert not path.exists()
    assert np.array_equal(np.array(array), expected) and expected.any()


def test_a_stopped_build_leaves_no_file(competition, tmp_path):
    a, _, _ = three_sets(competition)

    def stopped(item):
        raise KeyboardInterrupt  # as Ctrl-C in the middle of decoding

    with pytest.raises(KeyboardInterrupt):
        cache_images(a, 16, "disk", tmp_path, stopped)
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".*.npy"))  # no half-written .npy stays


def test_cache_max_gb_is_a_bookkeeping_key_and_never_negative(capsys):
    from workflows.config import BOOKKEEPING_KEYS
    from workflows.flags import parse_config
    assert parse_config(["--cache_max_gb", "1e-5"]).cache_max_gb == 1e-5 and "cache_max_gb" in BOOKKEEPING_KEYS
    with pytest.raises(SystemExit) as e:
        parse_config(["--cache_max_gb", "-1"])
    assert e.value.code == 2 and "cache_max_gb must be >= 0" in capsys.readouterr().err


# --- python cache.py list / clear ---

def test_cache_command_lists_and_clears(competition, tmp_path):
    a, b, _ = three_sets(competition)
    # a running run holds it: a shared flock on its .lock. The command takes the lock through an open file of its own,
    # which conflicts with this one as with another process's (flock is per open file), so it runs in this process
    held = cache_images(a, 16, "disk", tmp_path)[0]
    path_b = build(b, tmp_path)
    (tmp_path / f"{path_b.stem}.json").unlink()  # as a cache made before the .json record: read from the header
    (tmp_path / "preds").mkdir()
    (tmp_path / "preds" / "p.npy").write_bytes(b"x" * 5000)
    listed = run_script("cache", ["list", "--cache_dir", str(tmp_path)])
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines() if line.startswith("  ")}
    assert set(lines) == {held.path.stem, path_b.stem}
    assert "100 images x 16 px" in lines[path_b.stem] and "in use" in lines[held.path.stem]
    assert "in use" not in lines[path_b.stem] and re.search(r"preds/ +1 entries +5 kB", listed.stdout)
    cleared = run_script("cache", ["clear", "--decode", "--cache_dir", str(tmp_path)])
    assert cleared.returncode == 0, cleared.stderr
    assert not path_b.exists() and held.path.is_file() and (tmp_path / "preds" / "p.npy").is_file()
    assert "kept 1 in use by a running process" in cleared.stdout and held.path.stem in cleared.stdout
    del held
    cleared = run_script("cache", ["clear", "--all", "--cache_dir", str(tmp_path)])  # nothing in use now
    assert cleared.returncode == 0 and not list(tmp_path.glob("*.npy")) and not (tmp_path / "preds" / "p.npy").exists()
    assert "decode caches: deleted 1" in cleared.stdout and "preds/: deleted 1 entries, 5 kB" in cleared.stdout


def test_cache_command_clears_only_what_is_older(competition, tmp_path):
    a, b, _ = three_sets(competition)
    path_a, path_b = build(a, tmp_path), build(b, tmp_path)
    age(path_a, 3 * 86400)
    import cache  # in this process: no cache is in use by another one here, so no process of its own is needed
    assert cache.main(["clear", "--older_than", "2", "--cache_dir", str(tmp_path)]) == 0
    assert not path_a.exists() and path_b.is_file()


@pytest.mark.parametrize("args", [["list", "--cache_dir", "{tmp}/missing"],
                                  ["clear", "--all", "--cache_dir", "{tmp}/f"],
                                  ["clear", "--cache_dir", "{tmp}"], ["clear", "--decode", "--older_than", "-1"]])
def test_cache_command_errors_are_one_line(tmp_path, args, capsys):
    """In this process (cache.main, what `python cache.py` runs): no 4 s start-up (torch's import) per case."""
    import cache
    (tmp_path / "f").write_text("a file")
    try:
        code = cache.main([a.format(tmp=tmp_path) for a in args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
