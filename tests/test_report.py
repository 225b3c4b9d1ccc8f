"""report.html: every run writes one self-contained page (no external URL), valid HTML, and it renders
in headless Chromium with the misclassified gallery on screen."""
import re
import shutil
import subprocess
from html.parser import HTMLParser

import cv2
import pytest

from conftest import TINY_MODEL, run_train

VOID = {"meta", "img", "br", "hr", "input", "link", "source", "area", "base", "col", "embed", "param", "track", "wbr"}


class TagChecker(HTMLParser):
    """Every non-void element closed, in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.images = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    run_train(["--model", TINY_MODEL, "--img_size", "32", "--epochs", "2", "--workers", "0", "--wandb_mode", "disabled",
               "--table_rows", "40", "--out_dir", str(out)])
    return out / "report.html"


@pytest.mark.slow
def test_report_is_valid_and_self_contained(report):
    page = report.read_text()
    checker = TagChecker()
    checker.feed(page)
    assert page.startswith("<!DOCTYPE html>") and checker.errors == [] and checker.stack == []
    assert not re.search(r"https?:|url\(|(src|href)=\"(?!data:)", page)  # nothing to fetch
    gallery = checker.images
    assert 0 < len(gallery) <= 40 and all(i["src"].startswith("data:image/png;base64,") for i in gallery)
    assert "Per-class scores" in page and "Confusion matrix" in page and "<svg" in page


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package (apt install chromium)")
def test_report_renders_with_the_gallery_visible(report, tmp_path):
    shot = tmp_path / "report.png"
    chromium = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--window-size=1280,900"]
    subprocess.run([*chromium, f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120, check=True)
    dom = subprocess.run([*chromium, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    cards = report.read_text().count('class="card"')
    assert f'data-gallery-images="{cards}"' in dom  # every gallery image decoded by the browser
    image = cv2.imread(str(shot))
    assert image.shape[:2] == (900, 1280)
    gallery = image[120:900]  # below the title: the thumbnails' black backgrounds on a white page
    assert (gallery.max(axis=2) < 40).mean() > 0.05
    shutil.copy(shot, report.with_suffix(".png"))
    print(f"screenshot: {report.with_suffix('.png')}")
