"""The shift measure's calibration benchmark (benchmarks/shift_calibration.py): its quick mode runs, the recipes'
truth is applied as stated, and the scoring counts what the measure found against it."""
import numpy as np

from benchmarks import shift_calibration as cal


def test_quick_mode_prints_the_calibration_table(capsys):
    assert cal.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for source in cal.SOURCES:
        assert f"{source}: 2 recipes, 1 clean splits" in out
    assert "| operation | recipes with it | detected |" in out and "all sources" in out
    assert "clean splits with a false alarm: 0% of 2" in out  # a clean test split switches nothing on


def test_a_recipe_corrupts_its_share_and_the_score_counts_it():
    rng = np.random.default_rng(0)
    images = cal.documents(60, rng)
    assert min(float(img.mean()) for img in images) > 150  # light pages, unlike the digits' black background
    turned = cal.corrupt_split(images, {"turn": {"share": 0.5}}, rng, 1.0)
    changed = np.mean([not np.array_equal(a, b) for a, b in zip(images, turned)])
    assert 0.3 < changed < 0.7
    rows = cal.score_recipe({"noise": {"share": 0.6, "magnitude": 0.1}},
                            {"noise": (0.55, 0.12), "tint": (0.3, 20.0)})
    assert rows["noise"]["detected"] and abs(rows["noise"]["share_error"] - 0.05) < 1e-9
    assert abs(rows["noise"]["magnitude_error"] - 0.2) < 1e-9
    assert rows["tint"] == {"present": False, "alarm": True} and rows["blur"] == {"present": False, "alarm": False}
