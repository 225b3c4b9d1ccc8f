"""The shift measure's calibration benchmark (benchmarks/shift_calibration.py): its quick mode runs, the recipes'
truth is applied as stated, and the scoring counts what the measure found against it."""
import numpy as np

from benchmarks import shift_calibration as cal


def test_quick_mode_prints_the_calibration_table(capsys):
    assert cal.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for source in cal.SOURCES:
        assert f"{source}: 1 recipe, 1 clean split" in out
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


def test_the_documents_benchmark_is_a_competition_folder_with_its_answers_beside_it(tmp_path, monkeypatch):
    from benchmarks import documents
    from datasets import load_data
    from datasets.digits import score
    monkeypatch.setattr(documents, "TRAIN", [4, 3, 3, 3, 3, 3, 3, 2])
    monkeypatch.setattr(documents, "TEST_PER_KIND", 2)
    folder = documents.export(tmp_path / "docs", seed=1)
    data = load_data(str(folder))
    assert sorted(data.classes) == sorted(documents.KINDS) and len(data.labels) == 24 and len(data.test_ids) == 16
    answers = tmp_path / "docs.answers.csv"
    assert score(answers, answers) == 1.0 and score(folder / "sample_submission.csv", answers) < 0.2
    again = documents.export(tmp_path / "again", seed=1)  # the same seed, the same folder
    assert (again / "train.csv").read_bytes() == (folder / "train.csv").read_bytes()
    assert (again / "test" / "te_0003.png").read_bytes() == (folder / "test" / "te_0003.png").read_bytes()
    pages = {kind: documents.page(kind, np.random.default_rng(0)).astype(float) for kind in documents.KINDS}
    assert min(np.abs(pages[a] - pages[b]).mean() for a in pages for b in pages if a < b) > 5  # 8 unlike layouts
