"""W&B's public API (a server and a key): artifacts to download, an online sweep's runs best first. Usage:
    path = api.download_artifact("team/comp/model-abc:best", root)
    api.artifact_state("team/comp/model-abc:epoch-3")     # "COMMITTED", "PENDING", ... or None
    for run in api.sweep_runs_best_first("team/comp/sweep_id"): ...
wandb_api is the one seam tests replace with a fake (monkeypatch utils.tracking.api.wandb_api).
"""
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import wandb

from utils import UserError
from utils.background import answer_within


def wandb_api():
    """The W&B public API (needs a server and a key): the one seam tests replace with a fake."""
    return wandb.Api()


def download_artifact(ref: str, root: Path) -> Path:
    """Download ENTITY/PROJECT/NAME:ALIAS into root (files already there with the same digest are kept)."""
    try:
        artifact = wandb_api().artifact(ref)
    except Exception as e:  # noqa: BLE001 - wandb raises CommError, ValueError, UsageError...
        raise UserError(f"cannot fetch W&B artifact {ref}: {e}; offline, pass the run dir or checkpoint file "
                        f"instead") from None
    try:
        return Path(artifact.download(root=str(root)))
    except Exception as e:  # noqa: BLE001 - a network error, a full disk, a file W&B no longer has
        raise UserError(f"cannot download W&B artifact {ref} into {root}: {type(e).__name__}: {e}; run the command "
                        f"again (files already downloaded are kept)") from None


RUNS_PAGE = 100  # runs per public-API request
STATE_TIMEOUT_S = 10  # the longest a resumed run waits to learn whether an artifact version reached W&B


def artifact_state(ref: str, timeout: float = STATE_TIMEOUT_S) -> str | None:
    """The state W&B's server has for artifact version ref (COMMITTED once its upload finished; PENDING while it
    goes on), asked now; None when there is no such version or no answer within timeout seconds."""
    return answer_within(lambda: str(wandb_api().artifact(ref).state), timeout, "wandb-artifact-state")  # no such
    # version (CommError), no server, no key: None


class SweepRun(NamedTuple):
    id: str
    config: dict
    models: list[str]  # its committed model artifacts with alias best, by collection: model-<id>[-fold<k>]


def sweep_runs_best_first(path: str) -> Iterator[SweepRun]:
    """The finished runs (W&B run.state "finished") of an online sweep ENTITY/PROJECT/ID that have the sweep's
    metric in their summary, best first by it. The server filters (the sweep, finished) and each page of RUNS_PAGE
    runs comes with its config and summary: one request per page, not wandb's Sweep.runs (pages of 10, lazy, then
    one request per run for its summary). Lazy: each run's logged artifacts are listed (one API call) only when
    the caller takes that run."""
    try:
        api = wandb_api()
        sweep = api.sweep(path)
        metric = sweep.config.get("metric") or {}
        name, maximize = metric.get("name"), metric.get("goal", "minimize") == "maximize"
        project, sweep_id = path.rsplit("/", 1)
        runs = api.runs(project, filters={"$and": [{"sweep": sweep_id}, {"state": "finished"}]}, per_page=RUNS_PAGE,
                        lazy=False)
        scored = [r for r in runs if r.state == "finished" and isinstance(r.summary.get(name), (int, float))]
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read W&B sweep {path}: {e}") from None
    scored.sort(key=lambda r: r.summary[name], reverse=maximize)
    for r in scored:
        try:
            models = sorted({a.name.split(":")[0] for a in r.logged_artifacts()
                             if a.type == "model" and "best" in a.aliases and a.state == "COMMITTED"})
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot list the artifacts of W&B run {r.id} of sweep {path}: {e}") from None
        yield SweepRun(r.id, dict(r.config), models)
