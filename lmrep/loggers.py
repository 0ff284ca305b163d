"""A WandbLogger that goes offline without credentials and continues its run on resume.

Under DDP every process builds the logger, but only global rank 0 creates the W&B
run and owns the run id file (other ranks log nothing: WandbLogger's experiment is
a dummy there), so a multi-process run is one W&B run.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

RUN_ID_FILE = "wandb_run_id.txt"  # kept beside the run so a resumed run logs into the same W&B run


def has_wandb_credentials() -> bool:
    """True when W&B could log online: an API key in the environment or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def is_global_rank_zero() -> bool:
    """True in the process that will be global rank 0, also before the process group exists.

    Lightning sets `rank_zero_only.rank` at import from RANK, LOCAL_RANK or SLURM_PROCID;
    LOCAL_RANK alone is 0 on every node, so a NODE_RANK other than 0 rules a process out.
    """
    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def saved_run_id(save_dir: str | Path) -> str | None:
    """The W&B run id kept in `save_dir`, or None when the run has none yet."""
    path = Path(save_dir) / RUN_ID_FILE
    return path.read_text().strip() if path.exists() else None


def keep_run_id(save_dir: str | Path, run_id: str) -> None:
    """Write the run id file (creating the run folder) unless it is there already."""
    path = Path(save_dir) / RUN_ID_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")


class RunLogger(WandbLogger):
    """W&B logging for an lmrep run: offline when no credentials, one W&B run per run directory."""

    def __init__(
        self,
        *,
        save_dir: str = "runs/default",
        project: str = "lmrep",
        name: str | None = None,
        offline: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            save_dir: the run directory; W&B files and the run id live here.
            project: W&B project.
            name: W&B run name (default: the run directory's name).
            offline: force offline/online; None = offline unless W&B credentials are present.
            kwargs: passed on to WandbLogger.
        """
        if offline is None:
            offline = not has_wandb_credentials() or os.environ.get("WANDB_MODE") == "offline"
        # Nothing is written yet: the run folder and its id file appear when the W&B run starts
        # (`experiment`), so a run that fails before training (a bad config, missing data) leaves
        # nothing behind that a later run in the same run_dir would take up as its own.
        if is_global_rank_zero():  # the other ranks never start a W&B run, so they need no id
            kwargs.setdefault("id", saved_run_id(save_dir) or uuid.uuid4().hex[:12])
        kwargs.setdefault("resume", "allow")
        super().__init__(save_dir=save_dir, project=project, name=name or Path(save_dir).name, offline=offline, **kwargs)

    @property
    def experiment(self) -> Any:
        """The W&B run, started on first use; its id is kept in the run folder from then on."""
        if self._experiment is None and is_global_rank_zero():
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
            keep_run_id(self.save_dir, self._id)
        return super().experiment

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        # Close the W&B run, so a later run in the same process (a resume, a test) starts its own.
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None
            finish_writing()


def finish_writing() -> None:
    """Wait until W&B has written everything to disk.

    `run.finish()` can return before the W&B service has flushed an offline run's
    file (seen here: 1 run in 8 read back empty right after finish); shutting the
    service down waits for it. A later `wandb.init` starts a new service.
    """
    import wandb

    wandb.teardown()
