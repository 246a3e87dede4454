"""Durable checkpoints: atomic writes, folders checked before training, resumable ``last``/``best`` lookup, wired as
``Trainer(plugins=[AtomicCheckpointIO()], callbacks=[LastAndBestCheckpoint(monitor=..., save_last=True)])``."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import uuid
import warnings
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from .checkpoint import read_checkpoint

__all__ = ["AtomicCheckpointIO", "LastAndBestCheckpoint", "check_writable", "load_checkpoint_or_none",
           "resolve_checkpoint", "with_atomic_checkpoint_io"]


def _local_path(path: str | os.PathLike[str]) -> str | None:
    """``path`` as a plain local path, or None for a remote (fsspec) URL."""
    return str(path).removeprefix("file://") if isinstance(get_filesystem(path), LocalFileSystem) else None


def _new_file(folder: str, name: str) -> tuple[int, str]:
    """A new hidden file ``(fd, path)`` in ``folder``: its ``.tmp`` suffix keeps checkpoint globs off it after a crash,
    and it gets 0666 less the umask (``mkstemp``: 0600), which a checkpoint renamed from it keeps."""
    path = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable (remote fsspec paths use Lightning's writer):
    the temporary file lies beside the target (Lightning's, moved across filesystems, is copied in place, which a
    full disk truncated), fsynced before :func:`os.replace` and the folder after it; on failure the target is
    unchanged and an ``OSError`` names it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        local = _local_path(path)
        if local is None or storage_options is not None:  # storage_options: the parent raises its TypeError
            return super().save_checkpoint(checkpoint, path, storage_options)
        folder, name = os.path.split(os.path.abspath(local))
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = _new_file(folder, name)
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, local)
        except OSError as err:
            message = f"could not write checkpoint {local} ({err.strerror or err}); an earlier file there is unchanged"
            raise OSError(err.errno or errno.EIO, message) from err
        finally:
            if tmp is not None:  # left only by a failure
                with contextlib.suppress(OSError):
                    os.remove(tmp)
        with contextlib.suppress(OSError):  # make the rename durable; some platforms cannot fsync a folder
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def with_atomic_checkpoint_io(plugins: Any = None) -> list[Any]:
    """Trainer ``plugins`` (None, one or a list) plus an :class:`AtomicCheckpointIO` unless one is a CheckpointIO."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def check_writable(folder: str, what: str = "folder") -> None:
    """Create ``folder`` if needed and write, fsync and delete a probe file in it, or raise an ``OSError`` naming
    ``what``, the folder and the reason (read-only, disk full): reported before training, not at the first save."""
    # remove created folders again: Lightning makes them, and CSVLogger warns about an existing non-empty one
    created, parent = [], os.path.abspath(folder)
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        created.append(parent)  # deepest first
        parent = os.path.dirname(parent)
    fd = probe = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = _new_file(folder, "write-probe")
        os.write(fd, b"probe")
        os.fsync(fd)  # a full disk may only show here
    except OSError as err:
        raise OSError(err.errno or errno.EIO, f"cannot write to the {what} {folder} ({err.strerror or err})") from err
    finally:
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(OSError):  # a probe or folder left behind fails the removals after it anyway
            if probe:
                os.remove(probe)
            for made in created:
                os.rmdir(made)


def load_checkpoint_or_none(path: str) -> dict[str, Any] | None:
    """The Lightning checkpoint at ``path`` (on CPU, ``weights_only``), or None with a warning when it does not load
    (truncated, foreign, or without a ``state_dict``)."""
    try:
        ckpt = read_checkpoint(path)
        if "state_dict" in ckpt:
            return ckpt
        raise ValueError("not a Lightning checkpoint (no state_dict)")
    except Exception as err:  # truncated, corrupt, unreadable, foreign: all mean "not usable"
        warnings.warn(f"skipping checkpoint {path}: it does not load ({type(err).__name__}: {err})", stacklevel=2)
        return None


def resolve_checkpoint(which: str, checkpoint_dir: str | None, logger_dir: str | None) -> str | None:
    """Resolve ``"last"``/``"best"`` to a file of an earlier run: a new process has no in-memory best path, and each
    CLI run logs to a new ``version_N`` folder. Takes the newest loadable ``last*.ckpt`` in ``checkpoint_dir``, else
    in ``logger_dir/*/checkpoints``, and for ``"best"`` the loadable best file its ModelCheckpoint state names. None
    without such a run; ``FileNotFoundError`` for ``"best"`` when the runs found record no loadable best file."""
    if not (checkpoint_dir or logger_dir):
        return None
    pattern = os.path.join(checkpoint_dir or os.path.join(logger_dir, "*", "checkpoints"), "last*.ckpt")
    # newest first; the name breaks ties between files written within the filesystem's time resolution
    found = sorted(glob.glob(pattern), key=lambda p: (os.path.getmtime(p), p), reverse=True)
    tried = []
    for last in found:
        if (ckpt := load_checkpoint_or_none(last)) is None:
            continue
        if which == "last":
            return last
        recorded = [s["best_model_path"] for s in ckpt.get("callbacks", {}).values()  # ModelCheckpoint states
                    if isinstance(s, dict) and s.get("best_model_path")]
        paths = [p for r in recorded for p in (r, os.path.join(os.path.dirname(last), os.path.basename(r)))]
        best = next(filter(os.path.isfile, paths), None)  # the second of each pair: the run folder moved
        tried.append(f"{last} -> {best or 'no existing best file'}")
        if best is not None and load_checkpoint_or_none(best) is not None:
            return best
    if which == "best" and tried:
        raise FileNotFoundError(f"ckpt_path='best': no loadable best checkpoint recorded in {'; '.join(tried)}")
    return None


class LastAndBestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the latest state and whose best files hold what their score says:

    * ``setup`` fails before any step when the checkpoint or log folder cannot be written (:func:`check_writable`).
    * ``last.ckpt`` is rewritten after every validation (every epoch without one); Lightning 2.6 does so only with a
      top-k save in the same step, so with ``save_top_k=1`` "last" went back to the best epoch.
    * With a ``monitor``, only validated states (the score was measured on those weights) are top-k candidates:
      step/time-triggered saves just refresh ``last.ckpt``. Nor is a state with non-finite weights (a warning).
    * On resume, best score and top-k are restored when the saved folder is this one by real path.

    ModelCheckpoint has no public API to save top-k or last on demand, hence its private members of Lightning 2.5-2.6
    (every ``self._*`` used here but ``_in_step_save`` and ``_evaluated_step``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_step_save = False
        self._evaluated_step = 0  # global step of the last end-of-validation save decision; 0: nothing trained yet

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._fitting = stage == "fit"
        if stage != "fit" or trainer.fast_dev_run:  # fast_dev_run writes no checkpoints
            return
        folders = {"checkpoint folder": self.dirpath, "log folder": trainer.log_dir}  # log_dir: a collective call
        error: OSError | None = None
        try:
            for what, folder in folders.items():  # checkpoints and CSV logs are written by global rank 0 only
                if trainer.is_global_zero and folder and (local := _local_path(folder)) is not None:
                    check_writable(local, what)
        except OSError as err:
            error = err
        # every rank raises, so none waits forever at the next collective
        problem = trainer.strategy.broadcast(None if error is None else (error.errno, error.strerror))
        if error is not None or problem is not None:
            raise error or OSError(*problem)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._in_step_save = True  # step/time-triggered saves: a monitored score is from an earlier validation
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._in_step_save = False

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._should_save_on_train_epoch_end(trainer):
            self._save_evaluated(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_evaluated(trainer)

    def _save_evaluated(self, trainer: Trainer) -> None:
        """Top-k (when due) and ``last`` for the state that was just evaluated."""
        step = trainer.global_step
        if (trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking
                or step == self._evaluated_step):
            return
        self._evaluated_step = step
        self._defer_save_until_validation = False  # Lightning's deferred step save is covered here
        candidates = self._monitor_candidates(trainer)
        # without every_n_epochs (step/time-triggered), evaluated states are the only ones whose score is known
        if ((trainer.current_epoch + 1) % self._every_n_epochs == 0 if self._every_n_epochs >= 1
                else self.monitor is not None):
            self._save_topk_checkpoint(trainer, candidates)
        # Rewrite last unless it was the most recent file written in this step: after a new best file it must
        # name that file (resolve_checkpoint("best") reads it), and it must hold the weights validated here.
        if self.save_last and not (self._last_global_step_saved == step
                                   and self._last_checkpoint_saved == self.last_model_path):
            self._save_last_checkpoint(trainer, candidates)

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        # the one place where every top-k save passes
        if self.save_top_k == 0 or (self._in_step_save and self.monitor is not None):
            return  # step saves: the weights trained on after the score was measured; last.ckpt is still refreshed
        m = trainer.lightning_module  # one device sync for the whole model rather than one per tensor
        finite = bool(torch.stack([torch.isfinite(t).all() for t in (*m.parameters(), *m.buffers())
                                   if t.is_floating_point()] or [torch.tensor(True)]).all())
        # sharded strategies: each rank checks its shard, and all must agree before a collective save
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            rank_zero_warn(f"ModelCheckpoint: the model has non-finite weights at epoch {trainer.current_epoch}, step "
                           f"{trainer.global_step}; not saved as top-k (best stays {self.best_model_path or 'unset'})")
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not getattr(self, "_fitting", True):
            return  # validate/test/predict save nothing: no best score to carry (and no "dirpath has changed")
        # Lightning compares dirpath strings: a relative logger path and the same folder as an absolute
        # --checkpoint.dirpath differ, so best and top-k were lost and last.ckpt became last-v1.ckpt.
        real, saved_dir = os.path.realpath, state_dict.get("dirpath")
        if saved_dir and self.dirpath and real(saved_dir) == real(self.dirpath):
            paths = {k: real(state_dict[k]) for k in ("best_model_path", "kth_best_model_path", "last_model_path")
                     if state_dict.get(k)}
            topk = {real(k): v for k, v in state_dict.get("best_k_models", {}).items()}
            state_dict = {**state_dict, "dirpath": self.dirpath, **paths, "best_k_models": topk}
        super().load_state_dict(state_dict)
