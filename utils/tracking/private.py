"""Every use of wandb's private API in sweepcls, in one module: what a wandb upgrade must check again. Each was
read in wandb 0.31's own source (../shared/WANDB_NOTES.md records how); requirements.txt pins wandb <0.32. On
another release line, importing this says once on stderr that these uses were not checked there.
    settings = private.wandb_settings()           # the settings files and WANDB_BASE_URL, as wandb.init reads them
    private.set_by_file(settings, "mode")          # whether a settings file (not a default) set it
    private.key_for_host(settings)                 # a key for the server: this session's login, netrc, a file
    private.stop_requested_in_wandb(run, timeout)  # the stop status wandb-core last heard on the file stream
    private.stopped_on_server(run, timeout)        # the server asked now: True, False, or None (no answer)
    private.locked_config_keys(run)                # the config keys a sweep set (updates to them are ignored)
    private.use_after_commit(run, artifact)        # a draft artifact as the run's input, without waiting
"""
import os
import re
import sys
from pathlib import Path

import wandb
from wandb.errors import AuthenticationError
from wandb.sdk.lib import wbauth

from utils import UserError
from utils.background import answer_within

CHECKED = (0, 31)  # the wandb release line whose source these uses were read in


def version_checked(version: str = wandb.__version__) -> bool:
    """Whether `version` is of the release line these uses were checked against."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2]) == CHECKED


if not version_checked():
    print(f"note: wandb {wandb.__version__} is installed; sweepcls' uses of wandb internals were checked against "
          f"{CHECKED[0]}.{CHECKED[1]} (utils/tracking/private.py): run the tests before trusting online runs",
          file=sys.stderr)


def wandb_settings() -> wandb.Settings:
    """The settings wandb.init starts from, loaded as wandb.setup() loads them (wandb_setup._load_settings): the
    global file ($WANDB_CONFIG_DIR/settings, else ~/.config/wandb/settings; `wandb login --host` writes base_url
    there), the workspace file ./wandb/settings over it (`wandb offline` writes mode there), then WANDB_BASE_URL.
    A private Settings: loading wandb's session settings here would freeze the environment before init sets
    WANDB_DATA_DIR. Reads two files, no network."""
    settings = wandb.Settings(quiet=True)  # quiet: wandb.init itself says which settings files it loaded
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    settings.settings_system = str(Path(config_dir).expanduser() / "settings" if config_dir
                                   else Path("~", ".config", "wandb", "settings").expanduser())
    settings.update_from_system_settings()  # a broken file: wandb says why and ignores it, as wandb.init will
    if url := os.environ.get("WANDB_BASE_URL"):
        try:
            settings.update_from_env_vars({"WANDB_BASE_URL": url})
        except ValueError as e:  # pydantic's ValidationError
            msg = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
            raise UserError(f"WANDB_BASE_URL={url!r} is not a W&B server URL: {msg}") from None
    return settings


def set_by_file(settings: wandb.Settings, key: str) -> bool:
    """Whether a settings file (or the environment) set `key`, as opposed to wandb's default (pydantic's fields set)."""
    return key in settings.model_fields_set


def key_for_host(settings: wandb.Settings) -> bool:
    """Whether wandb.init would find an API key for settings.base_url beyond the environment, looked up as wandb's
    own wbauth._use_system_auth does: this session's wandb.login(), the netrc entry for the server's host ($NETRC,
    else ~/.netrc), an api_key in the settings files."""
    try:
        host = wbauth.HostUrl(settings.base_url)
    except ValueError as e:
        raise UserError(f"W&B server URL {settings.base_url}: {e}") from None
    if wbauth.session_credentials(host=host):
        return True
    try:
        found = wbauth.read_netrc_auth(host=host)
    except AuthenticationError:  # an entry wandb.init will refuse, saying why: a key all the same, not offline
        return True
    return bool(found or settings.api_key)


def stop_requested_in_wandb(run, timeout: float) -> bool:
    """Whether wandb-core has heard that W&B asked this run to stop (the UI's stop button; a sweep's early
    termination): the question wandb's own stop poller asks every 15 s (wandb/sdk/lib/run_stopping.py). Not a fresh
    question to the server: wandb-core's Sender.sendRequestStopStatus answers fileStream.IsStopped(), the "stopped"
    flag of the last file-stream response (every 15 s while data flows, 30 s as a heartbeat), so a stop the agent
    passes on at once as SIGTERM is usually not known here yet: stopped_on_server asks the server. No answer
    within timeout is False. Offline W&B answers at once, with False: nothing can ask an offline run to stop."""
    from wandb.proto import wandb_internal_pb2 as pb
    try:
        handle = run._interface._deliver(pb.Record(request=pb.Request(stop_status=pb.StopStatusRequest())))
        return bool(handle.wait_or(timeout=timeout).response.stop_status_response.run_should_stop)
    except Exception:  # noqa: BLE001 - a timeout, an abandoned handle, a wandb whose internals moved
        return False


STOPPED_QUERY = """
query RunStoppedStatus($projectName: String, $entityName: String, $runId: String!) {
    project(name: $projectName, entityName: $entityName) { run(name: $runId) { stopped } }
}"""  # wandb's own query for it (wandb/sdk/launch/api.py check_stop_requested; the agent's sweep query selects
# shouldStop and stopped, wandb/apis/public/sweeps.py)


def stopped_on_server(run, timeout: float) -> bool | None:
    """Whether W&B's server has this run marked stopped (a hyperband or UI stop sets it before the agent's SIGTERM),
    asked now through the public API's GraphQL transport (wandb.Api()._service_api, which has no public way to send
    a query in 0.31). None when no answer comes within timeout seconds (no server, no key, a network error): the
    caller decides what to assume."""
    def ask() -> bool:
        api = wandb.Api(timeout=max(1, round(timeout)))
        found = api._service_api.execute_graphql(STOPPED_QUERY, {
            "projectName": run.project, "entityName": run.entity, "runId": run.id})
        return bool(((found.get("project") or {}).get("run") or {}).get("stopped"))
    # no key, a CommError, a timeout, a wandb whose internals moved: None; an HTTP call may outlast timeout
    return answer_within(ask, timeout, "wandb-stop-status")


def locked_config_keys(run) -> set[str]:
    """The config keys wandb ignores updates to (a sweep's parameters, locked by wandb.init from the agent's
    WANDB_SWEEP_PARAM_PATH: wandb_config.Config._locked; an update to one is dropped with a warning)."""
    try:
        return set(run.config._locked)
    except Exception:  # noqa: BLE001 - a wandb whose internals moved: nothing known to be locked
        return set()


def use_after_commit(run, artifact) -> None:
    """A local (draft) artifact as an input of the run, without waiting for its upload: what run.use_artifact(draft)
    does (wandb_run.py: _log_artifact(..., use_after_commit=True)) minus its artifact.wait(), which has no time-out
    and would hold the caller for the whole upload; wandb-core records the use once the upload commits
    (core/pkg/artifacts/saver.go, gql.UseArtifact). On a wandb without it: logged as the run's output instead."""
    log = getattr(run, "_log_artifact", None)
    if log is None:
        run.log_artifact(artifact)
        return
    log(artifact, is_user_created=True, use_after_commit=True)
