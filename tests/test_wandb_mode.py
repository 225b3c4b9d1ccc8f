"""--wandb_mode auto reads wandb's own settings: the files `wandb login --host URL` (global: base_url) and
`wandb offline` (workspace ./wandb/settings: mode) write, and the netrc key for that host. No network."""
import pytest

import train
from utils import UserError, tracking

HOST = "https://wandb.example.com"
KEY = "0123456789abcdef" * 2 + "01234567"  # 40 hex characters, the form of a W&B API key


@pytest.fixture
def wandb_files(tmp_path, monkeypatch):
    """A clean slate: no WANDB_MODE, key or base URL in the environment; a global settings dir, a netrc and a
    working directory (for ./wandb/settings) of the test's own. Returns write(global=..., workspace=..., netrc=...)."""
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "config").mkdir()
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # absent until written
    monkeypatch.chdir(tmp_path)

    def write(global_settings: str = "", workspace: str = "", netrc: str = ""):
        if global_settings:  # as `wandb login --host URL` writes it
            (tmp_path / "config" / "settings").write_text("[default]\n" + global_settings)
        if workspace:  # as `wandb offline` writes it
            (tmp_path / "wandb").mkdir(exist_ok=True)
            (tmp_path / "wandb" / "settings").write_text("[default]\n" + workspace)
        if netrc:  # as `wandb login` writes it
            (tmp_path / "netrc").write_text(f"machine {netrc}\n  login user\n  password {KEY}\n")
    return write


def test_login_host_with_its_key_is_online(wandb_files, monkeypatch):
    wandb_files(global_settings=f"base_url = {HOST}\n", netrc="wandb.example.com")
    assert tracking.has_api_key()
    assert tracking.resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://other.example.com")  # the env var beats the file: no key there
    assert not tracking.has_api_key()
    assert tracking.resolve_mode("auto") == "offline"


def test_wandb_offline_in_workspace_beats_a_key(wandb_files, monkeypatch):
    # the global file says online, the workspace file (`wandb offline`) says offline: the workspace wins
    wandb_files(global_settings=f"base_url = {HOST}\nmode = online\n", workspace="mode = offline\n",
                netrc="wandb.example.com")
    assert tracking.resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert tracking.resolve_mode("auto") == "offline"


def test_wandb_mode_env_beats_settings_file(wandb_files, monkeypatch):
    wandb_files(workspace="mode = offline\n")
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert tracking.resolve_mode("auto") == "offline"  # the file, over the key
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert tracking.resolve_mode("auto") == "offline"


def test_explicit_flag_beats_env_and_settings_file(wandb_files, monkeypatch):
    wandb_files(workspace="mode = disabled\n")
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert tracking.resolve_mode("auto") == "disabled"  # the file, over the key
    assert tracking.resolve_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.resolve_mode("offline") == "offline"
    assert tracking.resolve_mode("disabled") == "disabled"


def test_sweep_agent_without_a_key_is_an_error_naming_the_host(wandb_files, monkeypatch):
    wandb_files(global_settings=f"base_url = {HOST}\n", workspace="mode = offline\n")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    with pytest.raises(UserError) as e:
        tracking.resolve_mode("auto")  # never offline under `wandb agent`, whatever the workspace file says
    message = str(e.value)
    assert "\n" not in message and HOST in message
    assert f"wandb login --host {HOST}" in message and "sweep.py" in message
    assert tracking.resolve_mode("offline") == "offline"  # an explicit choice still stands
    wandb_files(netrc="wandb.example.com")
    monkeypatch.setattr(tracking.mode, "_server_unreachable", lambda: "")  # the server's answer: it is there
    assert tracking.resolve_mode("auto") == "online"


def test_train_under_sweep_agent_without_a_key_exits_1_with_one_error_line(wandb_files, monkeypatch, tmp_path,
                                                                           capsys):
    wandb_files(global_settings=f"base_url = {HOST}\n")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    out = tmp_path / "run"
    code = train.main(["--data", "digits", f"--out_dir={out}", "--epochs=1", "--workers=0",
                       "--device=cpu", "--wandb_mode", "auto"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"wandb login --host {HOST}" in errors[0], err
    assert not out.exists()  # it stopped before the run existed, before any data was read
