"""Every image decoded once before training: a bad file fails now, by name (or is skipped), and the decoded copies
can be cached (datasets/cache.py). Usage: data, skipped = screen_images(data, skip_bad, cache, img_size)
"""
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from datasets.cache import cache_images
from datasets.files import Data, unreadable
from utils import UserError
from utils.stop import check_stop, stop_requested


def screen_images(data: Data, skip_bad: bool, cache: str = "none", img_size: int = 0, cache_dir=None,
                  cache_max_gb: float = 0.0) -> tuple[Data, list[str]]:
    """Decode every image once before training, so a corrupt, truncated or missing file fails now, by
    name, not inside a DataLoader worker. Returns the data to train on (a new Data; `data` is left as it was) and
    the ids of the training images skip_bad dropped. A bad test image is always an error (its row belongs in the
    submission). cache "ram" or "disk" (auto: ram for in-memory data, else disk) keeps the decoded images at
    img_size (datasets/cache.py), in the returned items and test_items in place of the paths; cache_max_gb bounds
    the disk caches of cache_dir together (0 = auto)."""
    test_items = data.test_items or []
    if cache == "auto":
        cache = "ram" if all(isinstance(i, np.ndarray) for i in data.items) else "disk"
    if cache == "none":
        def check(item):  # a stop leaves the rest unchecked (utils/stop.py)
            return None if stop_requested() else unreadable(item)
        with ThreadPoolExecutor(8) as pool:
            bad_train = {i: why for i, why in enumerate(pool.map(check, data.items)) if why}
            bad_test = {i: why for i, why in enumerate(pool.map(check, test_items)) if why}
        check_stop("checking the images")
        items, test = data.items, data.test_items
    else:
        items, bad_train = cache_images(data.items, img_size, cache, cache_dir, max_gb=cache_max_gb)
        test, bad_test = (cache_images(test_items, img_size, cache, cache_dir, max_gb=cache_max_gb) if test_items
                          else (None, {}))
    if bad_test:
        raise UserError(f"{len(bad_test)} test image(s) cannot be read, e.g. "
                        f"{[f'{test_items[i]} ({why})' for i, why in list(bad_test.items())[:3]]}; replace them")
    if bad_train and not skip_bad:
        raise UserError(f"{len(bad_train)} training image(s) cannot be read, e.g. "
                        f"{[f'{data.items[i]} ({why})' for i, why in list(bad_train.items())[:3]]}; replace them, or "
                        f"pass --skip_bad_images True to train without them")
    data = dataclasses.replace(data, items=items, test_items=test)
    skipped = [data.ids[i] for i in bad_train]
    if bad_train:
        data.drop(bad_train)  # the new Data's rows (drop rebinds its lists, the caller's stay whole)
    empty = [c for c, n in zip(data.classes, np.bincount(data.labels, minlength=len(data.classes))) if n == 0]
    if empty:
        raise UserError(f"class(es) {empty} have no training image{' left' if skipped else ''}; add images or "
                        f"remove the class from meta.csv")
    return data, skipped

