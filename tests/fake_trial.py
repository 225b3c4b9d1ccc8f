"""A stand-in for train.py in sweep tests: the same flags, run files and stop handling, with a scripted
metric instead of training, so the runner's crash and hyperband paths take seconds.
seed % 10 picks the behaviour: 0 = a poor run, 3 = a crash, anything else = a good run."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import tracking
from utils.runs import new_run_id
from utils.stop import Stopped, StopSignal
from workflows import config as config_module
from workflows.config import ADDED_CONFIG_KEYS, Config
from workflows.flags import parse_config

# the menu's valid names come from registries that import torch (about 4 s a trial on 2 cores); a stand-in that
# trains nothing takes the flags as they come
config_module.choices_of, config_module.describe_choices = (lambda f: None), (lambda f: "")


def main() -> int:
    with StopSignal() as stop:
        cfg = parse_config(sys.argv[1:])
        run_id = new_run_id()
        runs_dir = Path(os.environ.get("SWEEPCLS_RUNS_DIR", "runs"))
        run = tracking.init(cfg.to_dict(), run_id, runs_dir / run_id, "disabled")
        cfg = Config.from_dict(run.config(exclude=ADDED_CONFIG_KEYS))
        if cfg.seed % 10 == 3:
            raise RuntimeError("scripted crash")
        run.set_summary({"env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}})
        best = 0.0
        try:
            for epoch in range(1, cfg.epochs + 1):
                time.sleep(0.4)
                stop.check()
                value = 0.1 if cfg.seed % 10 == 0 else 0.9 - 0.01 * (cfg.seed % 10)
                best = max(best, value)
                run.log({"epoch": epoch, cfg.monitor: value})
                run.set_summary({cfg.monitor: best})
        except Stopped as e:
            run.finish(exit_code=e.exit_code)
            return e.exit_code
        run.finish()
        return 0


if __name__ == "__main__":
    sys.exit(main())
