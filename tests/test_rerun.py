"""A rerun never destroys a result: a folder that holds a finished run is refused before anything is written,
--restart moves it aside (never deletes it) and starts over, an interrupted run still resumes, and a folder
with nothing of value (a run stopped before training) is used as it is."""
import json
import re
from pathlib import Path

import pytest

import train
from conftest import TINY_MODEL, make_competition_folder
from workflows.config import Config

BASE = ["--model", TINY_MODEL, "--img_size", "32", "--epochs", "1", "--workers", "0", "--wandb_mode", "disabled"]


@pytest.fixture
def data(tmp_path):
    return make_competition_folder(tmp_path / "comp", n_train=40, n_test=6)


def files(folder: Path) -> dict:
    """Every file under folder: its bytes and mtime, by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def first_row(folder: Path) -> str:
    return (folder / "metrics.jsonl").read_text().splitlines()[0]


def test_a_finished_run_is_refused_and_left_as_it_was(tmp_path, data, capsys):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "summary.json").write_text('{"_exit_code": 143}')  # stopped before training: nothing to keep
    assert train.main(["--data", str(data), *BASE, "--out_dir", str(out_dir)]) == 0
    assert summary(out_dir)["_exit_code"] == 0 and (out_dir / "best.safetensors").is_file()
    before = files(out_dir)
    assert "best.safetensors" in before and "metrics.jsonl" in before
    capsys.readouterr()
    for again in ([], ["--resume", ""]):
        assert train.main(["--data", str(data), *BASE, *again, "--out_dir", str(out_dir)]) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"error: {out_dir} holds a run that finished at ") and "--restart" in err, err
        assert "a new --out_dir" in err and "Traceback" not in err
    assert files(out_dir) == before and not list(tmp_path.glob("run.before-*"))


def test_restart_moves_the_run_aside_and_starts_over(tmp_path, data, capsys):
    out_dir = tmp_path / "run"
    assert train.main(["--data", str(data), *BASE, "--out_dir", str(out_dir)]) == 0
    before = files(out_dir)
    capsys.readouterr()
    assert train.main(["--data", str(data), *BASE, "--restart", "True", "--out_dir", str(out_dir)]) == 0
    [aside] = tmp_path.glob("run.before-*")
    assert f"--restart: the earlier run in {out_dir} is now in {aside}" in capsys.readouterr().out
    assert files(aside) == before  # the old run whole, under its new name
    assert summary(out_dir)["_exit_code"] == 0 and (out_dir / "best.safetensors").is_file()
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == len(
        (aside / "metrics.jsonl").read_text().splitlines())  # one run's rows, not two


def test_an_interrupted_run_resumes_and_restart_starts_it_over(tmp_path, data, monkeypatch, capsys):
    from utils import UserError

    def fail(*args, **kwargs):
        raise UserError("simulated failure after the last epoch")
    out_dir = tmp_path / "run"
    with monkeypatch.context() as m:  # ends after its epochs with resume.pt saved: an interrupted run
        m.setattr(train, "finish_summary", fail)
        assert train.main(["--data", str(data), *BASE, "--out_dir", str(out_dir)]) == 1
    assert (out_dir / "resume.pt").is_file() and (out_dir / "best.safetensors").is_file()
    first = first_row(out_dir)

    assert train.main(["--data", str(data), *BASE, "--out_dir", str(out_dir)]) == 0  # --resume auto: continues
    assert first_row(out_dir) == first  # epoch 1 kept, not trained again
    assert summary(out_dir)["_exit_code"] == 0 and not (out_dir / "resume.pt").exists()

    with monkeypatch.context() as m:
        m.setattr(train, "finish_summary", fail)
        assert train.main(["--data", str(data), *BASE, "--restart", "True", "--out_dir", str(out_dir)]) == 1
    assert (out_dir / "resume.pt").is_file()
    before = files(out_dir)
    assert train.main(["--data", str(data), *BASE, "--restart", "True", "--out_dir", str(out_dir)]) == 0
    [_, aside] = sorted(tmp_path.glob("run.before-*"))  # the first --restart's, then this one's
    assert files(aside) == before  # the interrupted run, whole
    assert first_row(out_dir) != first_row(aside)  # epoch 1 trained again
    assert summary(out_dir)["_exit_code"] == 0 and not (out_dir / "resume.pt").exists()


def cfg(**kw) -> Config:
    return Config(**{"out_dir": "", **kw})


def claim_out_dir(cfg: Config, out_dir: Path) -> None:
    from workflows.resume import claim_out_dir  # here: the end-to-end tests above need none of today's names
    claim_out_dir(cfg, out_dir)


@pytest.mark.parametrize("layout,refused", [
    ({"fold0/best.safetensors": b"w", "fold0/last.safetensors": b"w"}, "a run's checkpoints (fold0/best.safetensors)"),
    ({"epoch-002.safetensors": b"w", "summary.json": b'{"_exit_code": 1}'}, "ended with exit code 1"),
    ({"summary.json": b'{"_exit_code": 0, "val/f1_macro": 0.5, "best_epoch": 3}'},
     "best val/f1_macro 0.5000 at epoch 3"),  # "a run that finished at <local time>, best ..."
    ({"last.safetensors": b"w", "summary.json": b'{"_exit_code": 130}'}, None),  # stopped inside epoch 1: no result
    ({"summary.json": b'{"_exit_code": 143}', "metrics.jsonl": b""}, None),
    ({}, None),
], ids=["cv fold", "failed after an epoch", "finished", "stopped in epoch 1", "stopped before training", "empty"])
def test_what_counts_as_a_result(tmp_path, layout, refused):
    from utils import UserError
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    for name, content in layout.items():
        (out_dir / name).parent.mkdir(exist_ok=True)
        (out_dir / name).write_bytes(content)
    if refused is None:
        claim_out_dir(cfg(), out_dir)
    else:
        with pytest.raises(UserError, match=re.escape(f"{out_dir} holds ") + ".*" + re.escape(refused)):
            claim_out_dir(cfg(), out_dir)
    assert set(files(out_dir)) == set(layout) and not list(tmp_path.glob("run.before-*"))  # nothing written, moved


def test_a_resume_file_from_elsewhere_does_not_unlock_a_finished_folder(tmp_path):
    from utils import UserError
    out_dir, other = tmp_path / "run", tmp_path / "other"
    for folder in (out_dir, other):
        folder.mkdir()
        (folder / "best.safetensors").write_bytes(b"w")
        (folder / "resume.pt").write_bytes(b"r")  # only its presence counts here; resume_from reads it after
    claim_out_dir(cfg(out_dir=str(out_dir), resume=str(out_dir)), out_dir)  # continues the run in its own folder
    claim_out_dir(cfg(resume=str(other)), tmp_path / "new-id")  # no --out_dir: it continues in other/
    with pytest.raises(UserError, match=re.escape(f"{out_dir} holds a run's checkpoints (best.safetensors); a fresh "
                                                  f"start would overwrite it. Pass --resume auto to continue it,")):
        claim_out_dir(cfg(out_dir=str(out_dir), resume=str(other)), out_dir)


def test_restart_never_overwrites_an_earlier_copy(tmp_path, monkeypatch, capsys):
    import workflows.resume
    monkeypatch.setattr(workflows.resume.time, "strftime", lambda fmt, *a: "20250101-120000")
    out_dir = tmp_path / "run"
    for n in range(3):
        out_dir.mkdir()
        (out_dir / "best.safetensors").write_text(str(n))
        claim_out_dir(cfg(restart=True), out_dir)
        assert not out_dir.exists()
    names = ["run.before-20250101-120000", "run.before-20250101-120000-2", "run.before-20250101-120000-3"]
    assert [(tmp_path / n / "best.safetensors").read_text() for n in names] == ["0", "1", "2"]
    claim_out_dir(cfg(restart=True), out_dir)  # nothing there: nothing to move
    monkeypatch.chdir(tmp_path)
    from utils import UserError
    with pytest.raises(UserError, match="the folder you are in"):
        claim_out_dir(cfg(restart=True), Path("."))


def test_restart_with_resume_from_elsewhere_is_a_conflict(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--restart", "True", "--resume", str(tmp_path / "other"), "--wandb_mode", "disabled"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--restart starts over in out_dir and --resume {tmp_path / 'other'}" in err


def test_the_stopped_line_says_how_to_continue_a_run_in_a_folder_of_its_own(tmp_path, monkeypatch):
    """Without --out_dir a rerun gets a new id and a new folder: only --resume finds the stopped one again."""
    from workflows.resume import RESUME_FILE, stopped_note
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    (tmp_path / RESUME_FILE).write_bytes(b"")
    assert f"the same command with --resume {tmp_path} continues it" in stopped_note(tmp_path, cfg())
    assert "(resume.pt, last.safetensors in" in stopped_note(tmp_path, cfg(out_dir=str(tmp_path)))
    assert ": the same command continues it" in stopped_note(tmp_path, cfg(out_dir=str(tmp_path)))
    monkeypatch.setenv("WANDB_RUN_ID", "trial001")  # a sweep's trial: its id, and so its folder, comes back
    assert ": the same command continues it" in stopped_note(tmp_path, cfg())
    (tmp_path / RESUME_FILE).unlink()
    assert stopped_note(tmp_path, cfg(restart=True)).startswith("nothing trained yet; the same command without "
                                                                "--restart starts it again in")
