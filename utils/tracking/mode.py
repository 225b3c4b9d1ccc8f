"""Which mode a run records in (online, offline, disabled) and whether W&B's server can be reached; no run is
started here. Usage:
    mode = mode.resolve_mode(cfg.wandb_mode)   # "auto": online with a key for the configured server, else offline
"""
import os
import socket
import urllib.parse
import urllib.request

import wandb

from utils import UserError
from utils.background import answer_within
from utils.tracking import private

_SETTINGS_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                   "disabled": "disabled"}  # a settings file's mode (wandb's Settings.mode) -> ours


def has_api_key(settings: wandb.Settings | None = None) -> bool:
    """Whether wandb.init would find an API key for the configured server without prompting: WANDB_API_KEY or
    WANDB_IDENTITY_TOKEN_FILE, else what private.key_for_host finds (a login, netrc, the settings files)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    return private.key_for_host(settings if settings is not None else private.wandb_settings())


SERVER_TIMEOUT_S = 5  # how long a run waits to learn that W&B's server cannot be reached at all


def _unreachable(base_url: str, timeout: float = SERVER_TIMEOUT_S) -> str:
    """Why no TCP connection to the server at base_url (its host and port: else 443 for https, 80 for http) opens
    within timeout seconds, the name lookup included; "" when one does. Nothing is sent."""
    parts = urllib.parse.urlsplit(base_url)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:  # a port that is no number
        return str(e)
    if not host:
        return "no host in the URL"
    def connect() -> str:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return ""
        except OSError as e:  # refused, no route, a name that does not resolve, timed out
            return e.strerror or str(e) or type(e).__name__
    return answer_within(connect, timeout, "wandb-server-probe", "no answer")  # a name lookup has no time-out


def proxy_for(url: str, settings: wandb.Settings | None = None) -> str:
    """The proxy a connection to url goes through, as wandb's HTTP client picks it: wandb's own http_proxy /
    https_proxy setting for the URL's scheme, else the environment's (HTTPS_PROXY, HTTP_PROXY) unless NO_PROXY names
    the host; "" when none."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme or "https"
    own = getattr(settings, f"{scheme}_proxy", None) if settings is not None else None
    if own:
        return own if "://" in own else f"http://{own}"
    proxy = urllib.request.getproxies_environment().get(scheme, "")
    if proxy and parts.hostname and urllib.request.proxy_bypass_environment(parts.hostname):
        return ""
    return proxy if not proxy or "://" in proxy else f"http://{proxy}"  # host:port alone: an HTTP proxy


def _server_unreachable() -> str:
    """"" when W&B's configured server (as wandb.init will find it) accepts a TCP connection within
    SERVER_TIMEOUT_S, or the proxy in between does (the server behind it is then wandb's to reach); else that it
    cannot be reached, its URL and why, as the start of a sentence."""
    settings = private.wandb_settings()
    url = settings.base_url
    proxy = proxy_for(url, settings)
    why = _unreachable(proxy or url)
    through = f" through the proxy {proxy}" if proxy else ""
    return f"W&B's server {url}{through} could not be reached within {SERVER_TIMEOUT_S} s ({why})" if why else ""


def resolve_mode(requested: str) -> str:
    """The mode a run records in, as _requested_mode resolves it; under `wandb agent` (WANDB_SWEEP_ID) an online
    run whose server cannot be reached within SERVER_TIMEOUT_S is a UserError naming it, not a wait for
    wandb.init's timeout and a traceback (a standalone run goes offline instead: init)."""
    mode = _requested_mode(requested)
    if mode == "online" and os.environ.get("WANDB_SWEEP_ID") and (unreachable := _server_unreachable()):
        raise UserError(f"wandb agent runs report to the sweep's server, but {unreachable}: check the network "
                        f"and the server, or run offline sweeps with `python sweep.py sweep.yaml`")
    return mode


def _requested_mode(requested: str) -> str:
    """--wandb_mode beats WANDB_MODE beats the mode in wandb's settings files (`wandb offline`: ./wandb/settings,
    which beats the global file) beats auto-detection: online when wandb.init would find an API key for the
    configured server (WANDB_BASE_URL, else the base_url `wandb login --host URL` saved, else wandb's default),
    else offline, since online wandb.init would fail or prompt. Under `wandb agent` (WANDB_SWEEP_ID) the run must
    report to the sweep's server, so auto never goes offline there: the settings files' mode is not applied and
    no key is a UserError. A resolved mode resolves to itself."""
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":  # wandb's old name for offline
        return "offline"
    settings = private.wandb_settings()
    sweep = os.environ.get("WANDB_SWEEP_ID")
    if not sweep and private.set_by_file(settings, "mode") and settings.mode in _SETTINGS_MODES:  # set by a file
        return _SETTINGS_MODES[settings.mode]
    if has_api_key(settings):
        return "online"
    if sweep:
        login = "wandb login" + (f" --host {settings.base_url}" if private.set_by_file(settings, "base_url") else "")
        raise UserError(f"wandb agent runs report to the sweep on {settings.base_url}, but no W&B API key is "
                        f"configured for it: run `{login}` (or set WANDB_API_KEY), or run offline sweeps with "
                        f"`python sweep.py sweep.yaml`")
    return "offline"
