"""An online run whose W&B server cannot be reached: standalone, it goes offline within seconds with one line saying
so and how to sync; under `wandb agent`, one error line naming the server. No network: the server is a closed local
port (nothing listens) or a socket that accepts connections and never answers."""
import socket
import time

import pytest

import train
from utils import UserError, tracking
from utils.runs import random_id

KEY = "0123456789abcdef" * 2 + "01234567"  # 40 hex characters, the form of a W&B API key


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Online by auto-detection (a key, no WANDB_MODE) against a server at a local port that refuses connections;
    returns its URL."""
    for key in ("WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.chdir(tmp_path)  # no ./wandb/settings but the test's own (none)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("WANDB_BASE_URL", url)
    return url


def _offline_run_checks(run, out, url, capsys, started):
    took = time.monotonic() - started
    try:
        lines = [line for line in capsys.readouterr().out.splitlines() if "W&B" in line]
        assert took < 15, f"took {took:.0f} s"
        assert len(lines) == 1, lines
        assert url in lines[0] and "could not be reached" in lines[0] and "offline" in lines[0]
        assert f"wandb sync {out.resolve() / 'wandb'}" in lines[0]
        assert run.mode == "offline"
        assert list((out / "wandb").glob("offline-run-*"))
    finally:
        run.finish()


@pytest.fixture
def proxy(monkeypatch):
    """A proxy at a local port that accepts connections (what the probe can know of one), named as clusters name
    it: HTTPS_PROXY and HTTP_PROXY; returns its URL."""
    for key in ("NO_PROXY", "no_proxy", "https_proxy", "http_proxy", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        monkeypatch.setenv("HTTPS_PROXY", url)
        monkeypatch.setenv("HTTP_PROXY", url)
        yield url


def test_a_server_behind_a_proxy_is_probed_through_it(server, proxy, monkeypatch):
    """wandb connects through the environment's proxy: the probe must too, not call the server unreachable (here
    it would be: nothing listens at its port) and send the agent's trial to an error."""
    assert tracking.mode._server_unreachable() == ""
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
    assert tracking.mode.resolve_mode("auto") == "online"


def test_no_proxy_for_the_servers_host_is_probed_directly(server, proxy, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert "could not be reached" in tracking.mode._server_unreachable()


def test_a_proxy_that_is_down_is_named(server, proxy, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"  # host:port alone, as many set it
    monkeypatch.setenv("HTTP_PROXY", closed)
    why = tracking.mode._server_unreachable()
    assert f"through the proxy http://{closed}" in why and server in why


def test_standalone_run_with_unreachable_server_goes_offline_saying_so(server, tmp_path, capsys):
    assert tracking.resolve_mode("auto") == "online"  # standalone: a key means online; init finds the server gone
    out = tmp_path / "run"
    started = time.monotonic()
    run = tracking.init({"model": "m"}, random_id(), out, "auto")
    _offline_run_checks(run, out, server, capsys, started)


def test_standalone_run_whose_server_hangs_goes_offline_after_init_timeout(server, tmp_path, monkeypatch, capsys):
    # the port accepts connections (the kernel's backlog) and never answers: wandb.init's own timeout, then offline
    with socket.socket() as hanging:
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(64)
        url = f"http://127.0.0.1:{hanging.getsockname()[1]}"
        monkeypatch.setenv("WANDB_BASE_URL", url)
        monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
        out = tmp_path / "run"
        started = time.monotonic()
        run = tracking.init({"model": "m"}, random_id(), out, "online")
        _offline_run_checks(run, out, url, capsys, started)


def test_sweep_agent_with_unreachable_server_is_a_user_error_naming_it(server, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    for requested in ("auto", "online"):
        started = time.monotonic()
        with pytest.raises(UserError) as e:
            tracking.resolve_mode(requested)
        assert time.monotonic() - started < 15
        message = str(e.value)
        assert "\n" not in message and server in message and "could not be reached" in message
    assert tracking.resolve_mode("offline") == "offline"  # an explicit choice still stands


def test_train_under_sweep_agent_with_unreachable_server_exits_1_with_one_error_line(server, monkeypatch, tmp_path,
                                                                                      capsys):
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    out = tmp_path / "run"
    started = time.monotonic()
    code = train.main(["--data", "digits", f"--out_dir={out}", "--epochs", "1", "--workers=0",
                       "--device=cpu", "--wandb_mode", "auto"])
    err = capsys.readouterr().err
    assert time.monotonic() - started < 15
    assert code == 1
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and server in errors[0], err
    assert not out.exists()  # it stopped before the run existed
