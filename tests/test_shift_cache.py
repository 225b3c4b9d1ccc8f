"""The test set's measured shift, cached per data set and img_size (datasets/shift_cache.py): a second run reads
it without measuring, anything the measure depends on measures again, a cache folder that cannot be written costs
only the measure, and `python cache.py list / clear` see the measures without taking them for decode caches."""
import dataclasses
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import _digit_images
from datasets import corruption, load_data, screen_images, shift, shift_cache
from datasets.cache import cache_images
from datasets.cache_folder import list_decode_caches
from datasets.shift_cache import measure_cached, shift_key
from utils import UserError
from workflows.flags import parse_config
from workflows.prepare import measure_test_shift, stored_images


class Recorder:
    """The run's one method measure_test_shift calls."""

    def __init__(self):
        self.config = {}

    def update_config(self, values: dict) -> None:
        self.config |= values


@pytest.fixture
def measures(monkeypatch) -> list:
    """shift.measure_data's calls, each answered at once with a measure that finds no shift (the real one takes a
    second or more; the first test runs it)."""
    calls = []

    def measure(train_items, test_items, img_size, native):
        calls.append(img_size)
        return {"images": [len(train_items), len(test_items)], "gap": {}, "settings": dict(shift.OFF),
                "poses": {"pose_accuracy": 0.0, "turned": 0.0, "mirrored": 0.0, "poses": [1.0] + [0.0] * 7}}
    monkeypatch.setattr(shift, "measure_data", measure)
    return calls


def arrays(n_train=40, n_test=40):
    images, _ = _digit_images(n_train + n_test)
    rgb = [np.repeat(i[..., None], 3, axis=2) for i in images]
    return rgb[:n_train], rgb[n_train:]


def test_a_second_run_reads_the_measure_without_measuring(tmp_path, monkeypatch, capsys):
    """The real measure: what is read back equals the dict it returned, and the W&B config gets the same."""
    train, test = arrays()
    test = [np.rot90(image).copy() for image in test]  # turned: a measure with settings on
    cfg = dataclasses.replace(parse_config([]), img_size=32, cache_dir=str(tmp_path / "c"))
    data = SimpleNamespace(items=train, ids=[f"i{k}" for k in range(len(train))], test_items=test)
    first, second = Recorder(), Recorder()
    measured = measure_test_shift(cfg, first, data, stored_images(data))
    assert re.search(r"\n  \(\d+\.\ds; aug_preset auto", capsys.readouterr().out)
    assert corruption.any_on(measured["settings"]), measured
    [path] = (tmp_path / "c" / "shift").glob("*.json")
    monkeypatch.setattr(shift, "measure_data", lambda *a: pytest.fail("measured again"))
    cached = measure_test_shift(cfg, second, data, stored_images(data))
    out = capsys.readouterr().out
    assert cached == measured and second.config == first.config == {"test_shift": measured}
    assert f"(cached, {path.stem}; aug_preset auto, val_noise auto)" in out and "test set vs training set" in out
    assert len(list(tmp_path.glob("c/*"))) == 1  # the shift/ folder alone: nothing a decode cache could be


def test_what_the_measure_depends_on_measures_again(competition, tmp_path, monkeypatch, measures):
    data = load_data(str(competition))
    run = lambda size=32, native=32: measure_cached(data.items, data.test_items, size, native, tmp_path)[2]
    assert [run(), run()] == ["measured", "cached"]
    test_file = data.test_items[3]
    os.utime(test_file, ns=(os.stat(test_file).st_atime_ns, os.stat(test_file).st_mtime_ns + 10**9))  # as an edit
    assert [run(), run()] == ["measured", "cached"]
    assert [run(size=40), run(native=64)] == ["measured", "measured"]
    monkeypatch.setattr(shift, "VERSION", shift.VERSION + 1)
    assert [run(), run()] == ["measured", "cached"]
    key = shift_key(data.items, data.test_items, 32, 32)
    (tmp_path / "shift" / f"{key}.json").write_text('{"shift": {"images": [1')  # torn (a crash): measured again
    assert [run(), run()] == ["measured", "cached"]
    assert len(measures) == 6 and len(list((tmp_path / "shift").glob("*.json"))) == 5
    source = tmp_path / "image_stats.py"  # an edit of the measure's code that forgets VERSION: measured again
    source.write_text("SIGMA = 1\n")
    before = shift_cache.code_digest((*shift_cache.CODE, SimpleNamespace(__file__=str(source))))
    source.write_text("SIGMA = 2\n")
    after = shift_cache.code_digest((*shift_cache.CODE, SimpleNamespace(__file__=str(source))))
    assert before != after
    monkeypatch.setattr(shift_cache, "CODE_DIGEST", after)  # as the next process, started after the edit
    assert [run(), run()] == ["measured", "cached"] and len(measures) == 7


def test_decoded_images_are_keyed_by_their_decode_cache(competition, tmp_path, measures):
    """--cache disk puts each data set's .npy in place of the paths: its name and the rows taken key the measure,
    without reading the pixels again."""
    data, _ = screen_images(load_data(str(competition)), skip_bad=False, cache="disk", img_size=32, cache_dir=tmp_path)
    run = lambda items: measure_cached(items, data.test_items, 32, 32, tmp_path)[2]
    rolled = data.items[np.roll(np.arange(len(data.items)), 1)]  # the same file, as many rows, other ones
    assert [run(data.items), run(data.items), run(rolled), run(rolled)] == ["measured", "cached", "measured", "cached"]
    edited = load_data(str(competition))
    test_file = edited.test_items[0]
    os.utime(test_file, ns=(os.stat(test_file).st_atime_ns, os.stat(test_file).st_mtime_ns + 10**9))
    test_items, _ = cache_images(edited.test_items, 32, "disk", tmp_path)  # another decode cache, another name
    assert measure_cached(data.items, test_items, 32, 32, tmp_path)[2] == "measured" and len(measures) == 3


def test_an_unwritable_cache_folder_still_measures(tmp_path, monkeypatch, capsys, measures):
    train, test = arrays()
    (tmp_path / "a-file").write_text("not a folder")
    cfg = dataclasses.replace(parse_config([]), img_size=32, cache_dir=str(tmp_path / "a-file" / "cache"))
    data = SimpleNamespace(items=train, ids=[f"i{k}" for k in range(len(train))], test_items=test)
    run = Recorder()
    for _ in range(2):
        assert measure_test_shift(cfg, run, data, stored_images(data)) == run.config["test_shift"]
        out = capsys.readouterr().out
        assert re.search(r"\(\d+\.\ds, not cached: .*a-file/cache/shift: .*; aug_preset auto", out), out
    assert len(measures) == 2

    def full(path, payload):  # the folder is there but the write fails (a full disk, a read-only mount)
        raise UserError(f"could not write {path}: No space left on device; ... resume with the same command")
    monkeypatch.setattr(shift_cache, "atomic_write_bytes", full)
    assert measure_cached(train, test, 32, 32, tmp_path)[2] == f"not cached: {tmp_path / 'shift'} cannot be written"


def test_cache_command_lists_and_clears_the_measures(tmp_path, capsys, measures):
    """In this process (cache.main, what `python cache.py` runs): no 4 s start-up per command."""
    import cache
    train, test = arrays()
    halves = [train[:20], train[20:]]  # two training sets: two measures
    for part in halves:
        assert measure_cached(part, test, 32, 32, tmp_path)[2] == "measured"
    cache_images([tmp_path / "missing.png"] * 3, 16, "disk", tmp_path)  # one decode cache beside them
    assert [c.state for c in list_decode_caches(tmp_path)] == ["ready"]  # shift/ holds no decode cache
    assert cache.main(["list", "--cache_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "decode caches (--cache disk), least recently used first: 1," in out
    assert re.search(r"shift/ +2 entries +[\d.]+ kB +test-set shift measures", out), out
    assert cache.main(["clear", "--decode", "--cache_dir", str(tmp_path)]) == 0
    assert len(list((tmp_path / "shift").glob("*.json"))) == 2 and "shift/" not in capsys.readouterr().out
    assert cache.main(["clear", "--shift", "--cache_dir", str(tmp_path)]) == 0
    assert "shift/: deleted 2 entries" in capsys.readouterr().out and not list((tmp_path / "shift").iterdir())
    for part in halves:
        measure_cached(part, test, 32, 32, tmp_path)
    assert cache.main(["clear", "--all", "--cache_dir", str(tmp_path)]) == 0
    assert "shift/: deleted 2 entries" in capsys.readouterr().out


@pytest.mark.parametrize("cache", ["disk"])
def test_train_measures_the_images_as_stored_not_the_decode_cache(competition, tmp_path, monkeypatch, capsys, cache):
    """The decode cache replaces data.items with copies at img_size; noise and JPEG are read as stored, so the
    measure must get the files."""
    import train
    from workflows import prepare
    seen = {}

    def record(train_items, test_items, img_size, native, cache_dir=None):
        seen.update(train=train_items, test=test_items, native=native)
        raise UserError("measured: enough for this test")
    monkeypatch.setattr(prepare, "measure_cached", record)
    assert train.main(["--data", str(competition), "--img_size", "64", "--cache", cache, "--wandb_mode",
                       "disabled", "--out_dir", str(tmp_path / "run"), "--model", "test_resnet"]) == 1
    assert "measured: enough for this test" in capsys.readouterr().err
    assert all(not isinstance(item, np.ndarray) and str(item).endswith(".png") for item in seen["train"] + seen["test"])
    assert len(seen["train"]) == 240 and seen["native"] == 32  # the files' own side, not the cache's 64
