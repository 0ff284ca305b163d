"""The invertibility curves of a trained family, logged into that family's own W&B run after training.

Training logs the loss curves into the run (`lmrep.loggers.RunLogger`, offline
without credentials); this continues the same run (its id is kept in the run
directory) and adds one history row per probed step with every protocol's
recovery, at x = train_step, so one W&B run holds both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from data.files import write_text_atomic
from lmrep.atlas.stages import ProbedDir
from lmrep.atlas.table import cell_table, collect_rows
from lmrep.loggers import RUN_ID_FILE, finish_writing, has_wandb_credentials

LOGGED_FILE = "wandb_probes.json"  # which probe folders are already in the W&B run


def log_probes(name: str, run_dir: Path, dirs: Sequence[ProbedDir]) -> bool:
    """Log the probe curves of `dirs` into the run's W&B run; False when they are in it already."""
    key = sorted(str(d.path.name) for d in dirs)
    marker = run_dir / LOGGED_FILE
    if not dirs or (marker.exists() and json.loads(marker.read_text()) == key):
        return False
    id_file = run_dir / RUN_ID_FILE
    if not id_file.exists():
        return False  # trained without the default W&B logger: nothing to continue
    import wandb

    online = has_wandb_credentials() and os.environ.get("WANDB_MODE") != "offline"
    run = wandb.init(project="lmrep", id=id_file.read_text().strip(), resume="allow", dir=str(run_dir),
                     name=run_dir.name, mode="online" if online else "offline", reinit="finish_previous")
    try:
        run.define_metric("train_step")
        run.define_metric("atlas/*", step_metric="train_step")
        by_step: dict[int, dict[str, float]] = {}
        for cell in cell_table(collect_rows(dirs)):
            for metric, label in (("self_acc", "self"), ("nonself_acc", "nonself")):
                if cell.get(metric) is not None:
                    key_name = f"atlas/{cell['protocol']}/{label}/m{cell['mask']}/block_{cell['block']}"
                    by_step.setdefault(cell["step"], {})[key_name] = cell[metric]
        for step in sorted(by_step):
            run.log({"train_step": step, **by_step[step]})
    finally:
        run.finish()
        finish_writing()
    write_text_atomic(marker, json.dumps(key))
    print(f"W&B: {name} invertibility curves logged into the training run in {run_dir / 'wandb'}")
    return True
