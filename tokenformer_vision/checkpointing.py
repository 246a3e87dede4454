"""Durable checkpoints: atomic writes, folders checked before training, resumable ``last``/``best`` lookup.

* :class:`AtomicCheckpointIO` (a Trainer plugin) writes every checkpoint to a temporary file in the target's folder,
  fsyncs it and renames it onto the target, so a failed write (disk full, quota, I/O error) never leaves a truncated
  file under a checkpoint name and the previous ``last.ckpt`` stays loadable.
* :class:`LastAndBestCheckpoint` (a ``ModelCheckpoint``) checks that its folder and the log folder are writable
  before the first step, keeps ``last.ckpt`` current after every validation, decides top-k ("best") only on states
  whose monitored score was measured on them, and never picks a model with non-finite weights as best.
* :func:`resolve_checkpoint` turns ``"last"``/``"best"`` into a file of an earlier run, skipping files that do not
  load.

Wiring::

    trainer = Trainer(plugins=[AtomicCheckpointIO()], callbacks=[LastAndBestCheckpoint(monitor=..., save_last=True)])
"""

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

__all__ = [
    "AtomicCheckpointIO",
    "LastAndBestCheckpoint",
    "check_writable",
    "load_checkpoint_or_none",
    "resolve_checkpoint",
    "with_atomic_checkpoint_io",
]

TMP_SUFFIX = ".tmp"


def _local_path(path: str | os.PathLike[str]) -> str | None:
    """``path`` as a plain local path, or None for a remote (fsspec) URL."""
    fs = get_filesystem(path)
    if not isinstance(fs, LocalFileSystem):
        return None
    path = str(path)
    return path[len("file://"):] if path.startswith("file://") else path


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable. Best effort: some platforms cannot open a folder for fsync."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp_beside(path: str) -> tuple[int, str]:
    """Open a new, uniquely named temporary file in ``path``'s folder; returns ``(fd, name)``.

    The name is hidden and ends in ``.tmp``, so no checkpoint glob (``*.ckpt``, ``last*``) matches it even if a
    crash leaves it behind. Unlike ``tempfile.mkstemp`` (mode 0600), the file gets the usual permissions (0666 less
    the umask) that the renamed checkpoint keeps.
    """
    folder, base = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable.

    Lightning's own writer goes through a temporary file elsewhere and then moves it; across filesystems that move is
    an in-place copy, so a full disk replaced a good ``last.ckpt`` with a truncated one. Here the temporary file is
    created beside the target (same filesystem, so :func:`os.replace` is an atomic rename), flushed and fsynced
    before the rename, and the folder is fsynced after it. On failure the temporary file is removed, the target is
    left as it was, and an ``OSError`` naming the checkpoint is raised. Remote (fsspec) paths use Lightning's writer.
    Add it with ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        local = _local_path(path)
        if local is None or storage_options is not None:
            # remote storage has its own commit semantics; storage_options raise the parent's TypeError
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        folder = os.path.dirname(os.path.abspath(local))
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = _create_temp_beside(local)
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, local)
        except BaseException as err:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            if isinstance(err, OSError):
                message = (f"could not write checkpoint {local} ({err.strerror or err}); "
                           f"an earlier file of that name is unchanged")
                raise (OSError(err.errno, message) if err.errno is not None else OSError(message)) from err
            raise
        _fsync_dir(folder)


def with_atomic_checkpoint_io(plugins: Any = None) -> list[Any]:
    """``plugins`` (None, one plugin or a list) plus an :class:`AtomicCheckpointIO`, unless it has a CheckpointIO.

    For building a Trainer's ``plugins`` argument without overriding a CheckpointIO chosen by the user.
    """
    if plugins is None:
        plugins = []
    elif not isinstance(plugins, list | tuple):
        plugins = [plugins]
    plugins = list(plugins)
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def check_writable(folder: str, what: str = "folder") -> None:
    """Create ``folder`` if needed and write, fsync and delete a probe file in it.

    Raises ``OSError`` naming ``what``, the folder and the reason (e.g. read-only file system, disk full) when any
    step fails, so an unwritable folder is reported before training instead of at the first checkpoint.
    """
    # Folders created here are removed again: Lightning creates them at the first write, and a log folder that
    # already exists and is not empty makes CSVLogger warn that earlier logs will be deleted.
    created = []
    parent = os.path.abspath(folder)
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        created.append(parent)  # deepest first
        parent = os.path.dirname(parent)
    probe = os.path.join(folder, f".write-probe-{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    fd = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"probe")
        os.fsync(fd)  # a full disk may only show here
    except OSError as err:
        reason = err.strerror or str(err)
        raise OSError(err.errno or errno.EIO, f"cannot write to the {what} {folder} ({reason})") from err
    finally:
        if fd is not None:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.remove(probe)
        for made in created:
            with contextlib.suppress(OSError):
                os.rmdir(made)


def load_checkpoint_or_none(path: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (tensors on CPU, ``weights_only``), or None with a warning when it does not load.

    A file "loads" when ``torch.load`` succeeds and gives a dict with a ``state_dict``: a truncated or foreign file
    does not.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, unpickling error, I/O error: all mean "not usable"
        warnings.warn(f"skipping checkpoint {path}: it does not load ({type(err).__name__}: {err})", stacklevel=2)
        return None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        warnings.warn(f"skipping checkpoint {path}: not a Lightning checkpoint (no state_dict)", stacklevel=2)
        return None
    return ckpt


def _recorded_best(ckpt: dict[str, Any], last: str) -> str | None:
    """The best checkpoint file named by the ModelCheckpoint state inside ``ckpt`` (a ``last`` checkpoint)."""
    for state in ckpt.get("callbacks", {}).values():  # keyed by class name + settings (subclasses included)
        if isinstance(state, dict) and state.get("best_model_path"):
            best = state["best_model_path"]
            if os.path.isfile(best):
                return best
            # the run folder may have moved: look next to last.ckpt
            moved = os.path.join(os.path.dirname(last), os.path.basename(best))
            if os.path.isfile(moved):
                return moved
    return None


def resolve_checkpoint(which: str, checkpoint_dir: str | None, logger_dir: str | None) -> str | None:
    """Resolve ``"last"``/``"best"`` to a file from an earlier run (a new process has no in-memory best path).

    Every CLI run logs to a new ``version_N`` folder, so Lightning itself only looks for ``last.ckpt`` in the
    folder of the run being started. Here the newest ``last*.ckpt`` under ``checkpoint_dir`` (an explicit
    ``--checkpoint.dirpath``) or ``logger_dir/*/checkpoints`` that loads is taken (files that do not load, e.g.
    truncated by a crash, are skipped with a warning); for ``"best"`` the ModelCheckpoint state inside it names the
    best file, which must load too. Returns None when there is no earlier run with a loadable ``last`` file; raises
    ``FileNotFoundError`` for ``"best"`` when the runs found record no loadable best file.
    """
    if checkpoint_dir:
        pattern = os.path.join(checkpoint_dir, "last*.ckpt")
    elif logger_dir:
        pattern = os.path.join(logger_dir, "*", "checkpoints", "last*.ckpt")
    else:
        return None
    # newest first; the name breaks ties between files written within the filesystem's time resolution
    found = sorted(glob.glob(pattern), key=lambda p: (os.path.getmtime(p), p), reverse=True)
    tried = []
    for last in found:
        ckpt = load_checkpoint_or_none(last)
        if ckpt is None:
            continue
        if which == "last":
            return last
        best = _recorded_best(ckpt, last)
        tried.append(f"{last} -> {best or 'no existing best file'}")
        if best is not None and load_checkpoint_or_none(best) is not None:
            return best
    if which == "best" and tried:
        raise FileNotFoundError(f"ckpt_path='best': no loadable best checkpoint recorded in {'; '.join(tried)}")
    return None


def _is_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter and floating-point buffer (e.g. BatchNorm statistics) of ``module`` is finite."""
    tensors = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    # one device sync for the whole model rather than one per tensor
    return bool(torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all())


class LastAndBestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the latest state and whose best files hold what their score says.

    On top of Lightning's behaviour:

    * Fit fails in ``setup``, before any training step, when the checkpoint folder or the trainer's log folder
      cannot be created or written (see :func:`check_writable`).
    * ``last.ckpt`` is rewritten after every validation (after every training epoch when there is no validation).
      Lightning 2.6 does so only when a top-k checkpoint was saved in the same step, so with ``save_top_k=1`` it
      becomes a copy of the best one and resuming from "last" goes back to an older epoch.
    * With a ``monitor``, top-k ("best") candidates are the states at the end of a validation (or of a training
      epoch without validation): the score was measured on exactly those weights. Saves triggered by
      ``every_n_train_steps``/``train_time_interval`` only refresh ``last.ckpt``; Lightning made them top-k
      candidates labelled with the score of the previous validation although the weights had trained on since.
    * A state with a non-finite parameter or buffer is never saved as a top-k checkpoint (a warning says so);
      ``last.ckpt`` is still written, since it must be the latest state, so a diverged run keeps its best file.
    * On resume, best score and top-k are restored when the saved folder is this one by real path, not only when
      the path strings are equal.

    It relies on these private ``ModelCheckpoint`` members of Lightning 2.5-2.6: ``_save_topk_checkpoint``
    (overridden), ``_save_last_checkpoint``, ``_monitor_candidates``, ``_should_save_on_train_epoch_end``,
    ``_every_n_epochs``, ``_last_global_step_saved``, ``_last_checkpoint_saved`` and
    ``_defer_save_until_validation``. ModelCheckpoint has no public API to save top-k or last on demand.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_step_save = False
        self._evaluated_step = 0  # global step of the last end-of-validation save decision; 0: nothing trained yet

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or trainer.fast_dev_run:  # fast_dev_run writes no checkpoints
            return
        folders = {"checkpoint folder": self.dirpath, "log folder": trainer.log_dir}  # log_dir: a collective call
        error: OSError | None = None
        if trainer.is_global_zero:  # checkpoints and CSV logs are written by global rank 0 only
            for what, folder in folders.items():
                local = _local_path(folder) if folder else None
                if local is None:
                    continue
                try:
                    check_writable(local, what)
                except OSError as err:
                    error = err
                    break
        # every rank raises, so none waits forever at the next collective
        problem = trainer.strategy.broadcast(None if error is None else (error.errno, error.strerror))
        if error is not None:
            raise error
        if problem is not None:
            raise OSError(*problem)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # step/time-triggered saves: the monitored score (if any) is from an earlier validation
        self._in_step_save = True
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
        if self._topk_due(trainer):
            self._save_topk_checkpoint(trainer, candidates)
        # Rewrite last unless it was the most recent file written in this step: after a new best file it must
        # name that file (resolve_checkpoint("best") reads it), and it must hold the weights validated here.
        if self.save_last and not (self._last_global_step_saved == step
                                   and self._last_checkpoint_saved == self.last_model_path):
            self._save_last_checkpoint(trainer, candidates)

    def _topk_due(self, trainer: Trainer) -> bool:
        if self._every_n_epochs >= 1:
            return (trainer.current_epoch + 1) % self._every_n_epochs == 0
        # step/time-triggered: with a monitor, evaluated states are the only ones whose score is known
        return self.monitor is not None

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        # private ModelCheckpoint method: the one place where every top-k save passes
        if self.save_top_k == 0:
            return
        if self._in_step_save and self.monitor is not None:
            return  # the weights trained on after the score was measured; last.ckpt is still refreshed
        finite = _is_finite(trainer.lightning_module)
        # sharded strategies: each rank checks its shard, and all must agree before a collective save
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            rank_zero_warn(f"ModelCheckpoint: the model has non-finite weights at epoch {trainer.current_epoch}, "
                           f"step {trainer.global_step}; not saving it as a top-k checkpoint (best stays "
                           f"{self.best_model_path or 'unset'})")
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores best score and top-k only when the saved dirpath equals this one, comparing strings:
        # a logger-derived relative path and the same folder given as --checkpoint.dirpath (made absolute by
        # Lightning) count as different. Compare real paths, and make the saved file paths absolute too, so that
        # the resumed run keeps its best checkpoint and overwrites last.ckpt instead of writing last-v1.ckpt.
        saved_dir = state_dict.get("dirpath")
        if saved_dir and self.dirpath and os.path.realpath(saved_dir) == os.path.realpath(self.dirpath):
            state_dict = dict(state_dict, dirpath=self.dirpath)
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if state_dict.get(key):
                    state_dict[key] = os.path.realpath(state_dict[key])
            if "best_k_models" in state_dict:
                state_dict["best_k_models"] = {os.path.realpath(k): v for k, v in state_dict["best_k_models"].items()}
        super().load_state_dict(state_dict)
