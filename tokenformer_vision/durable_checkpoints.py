"""Durable checkpoints: atomic writes, folders checked before training, resumable ``last``/``best`` lookup, wired as
``Trainer(plugins=[AtomicCheckpointIO()], callbacks=[LastAndBestCheckpoint(monitor=..., save_last=True)])``."""

from __future__ import annotations

import contextlib
import errno
import glob
import inspect
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any
from weakref import proxy

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .weights import read_checkpoint

__all__ = ["AtomicCheckpointIO", "LastAndBestCheckpoint"]


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
        except (OSError, RuntimeError) as err:
            # torch's zip writer reports a failed write (a full disk) as "unexpected pos ...": the OSError is its cause
            cause, seen = err, []
            while cause is not None and not isinstance(cause, OSError) and cause not in seen:  # `raise e from e`
                seen.append(cause)
                cause = cause.__cause__ or cause.__context__
            if not isinstance(cause, OSError):
                raise
            msg = f"could not write checkpoint {local} ({cause.strerror or cause}); an earlier file there is unchanged"
            if cause.errno == errno.ENOSPC:
                msg += "; free space on that disk or choose another --checkpoint.dirpath"
            raise OSError(cause.errno or errno.EIO, msg) from None
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
    return plugins if any(isinstance(p, CheckpointIO) for p in plugins) else [*plugins, AtomicCheckpointIO()]


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
        if "state_dict" not in (ckpt := read_checkpoint(path)):
            raise ValueError("not a Lightning checkpoint (no state_dict)")
        return ckpt
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
    """``ModelCheckpoint`` whose ``last.ckpt`` is the latest state and whose best files hold what their score says.

    ``setup`` fails before any step when the checkpoint or log folder cannot be written; ``last.ckpt`` is rewritten
    after every validation (every epoch without one); with a ``monitor``, only validated states with finite weights
    are top-k candidates (step/time-triggered saves just refresh ``last.ckpt``); on resume, best score and top-k are
    restored when the saved folder is this one by real path. It takes ModelCheckpoint's arguments (``save_last="link"``
    excepted) and keeps its public state, but decides and writes its files itself (ModelCheckpoint's save decisions
    are private methods), through ``trainer.save_checkpoint`` and ModelCheckpoint's public members.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.save_last == "link":
            raise ValueError("LastAndBestCheckpoint: save_last='link' is not supported; use save_last=True")
        given = inspect.signature(ModelCheckpoint.__init__).bind(self, *args, **kwargs).arguments  # no public copy
        self._steps_trigger = int(given.get("every_n_train_steps") or 0)
        self._time_trigger = given.get("train_time_interval")
        self._on_train_epoch_end = given.get("save_on_train_epoch_end")
        self._version_counter = bool(given.get("enable_version_counter", True))
        self._saved_step, self._saved_path = 0, ""  # the latest file this callback wrote, and its step
        self._evaluated_step = 0  # global step of the last end-of-validation save decision; 0: nothing trained yet
        self._last_time: float | None = None
        self._fitting = True

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

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_time = time.monotonic()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._skip(trainer) or trainer.global_step == self._saved_step:
            return
        due = self._steps_trigger >= 1 and trainer.global_step % self._steps_trigger == 0
        if self._time_trigger is not None and not due:
            now = time.monotonic()
            # rank 0's clock decides, so that every rank joins the same collective save
            due = bool(trainer.strategy.broadcast(now - (self._last_time or now) >= self._time_trigger.total_seconds()))
            if due:
                self._last_time = now
        if due:
            candidates = self._candidates(trainer)
            if self.monitor is None:  # no score to trust or distrust: a step save is a top-k candidate as usual
                self._save_topk(trainer, candidates)
            self._save_last(trainer, candidates)  # with a monitor, the score is from an earlier validation

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_evaluated(trainer, at_train_epoch_end=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_evaluated(trainer, at_train_epoch_end=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last and not self._saved_path and not trainer.fast_dev_run:
            self._save_last(trainer, self._candidates(trainer))

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if (getattr(self, "save_on_exception", False) and not trainer.fast_dev_run and not trainer.sanity_checking
                and self._saved_step != trainer.global_step):
            candidates = self._candidates(trainer)
            self._write(trainer, self.format_checkpoint_name(candidates))
            self._save_last(trainer, candidates)

    def _skip(self, trainer: Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    def _save_evaluated(self, trainer: Trainer, at_train_epoch_end: bool) -> None:
        """Top-k (when due) and ``last`` for the state just evaluated, at ModelCheckpoint's moment: the end of the
        training epoch when validation runs once at its end (or not at all), else the end of validation."""
        on_epoch_end = self._on_train_epoch_end
        if on_epoch_end is None:
            batches = trainer.num_val_batches
            on_epoch_end = trainer.check_val_every_n_epoch == 1 and (
                (sum(batches) if isinstance(batches, list) else batches) == 0 or trainer.val_check_interval == 1.0)
        step = trainer.global_step
        if bool(on_epoch_end) != at_train_epoch_end or self._skip(trainer) or step == self._evaluated_step:
            return
        self._evaluated_step = step
        candidates = self._candidates(trainer)
        n = self.every_n_epochs or 0
        # without every_n_epochs (step/time-triggered), evaluated states are the only ones whose score is known
        if (trainer.current_epoch + 1) % n == 0 if n >= 1 else self.monitor is not None:
            self._save_topk(trainer, candidates)
        # Rewrite last unless it was the most recent file written in this step: after a new best file it must
        # name that file (resolve_checkpoint("best") reads it), and it must hold the weights validated here.
        if self.save_last and not (self._saved_step == step and self._saved_path == self.last_model_path):
            self._save_last(trainer, candidates)

    def _candidates(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        """The logged metrics plus ``epoch`` and ``step``, for the file names and the monitored score."""
        metrics = dict(trainer.callback_metrics)
        for key, value in (("epoch", trainer.current_epoch), ("step", trainer.global_step)):
            metrics[key] = metrics[key].int() if isinstance(metrics.get(key), torch.Tensor) else torch.tensor(value)
        return metrics

    def _finite(self, trainer: Trainer) -> bool:
        m = trainer.lightning_module  # one device sync for the whole model rather than one per tensor
        finite = bool(torch.stack([torch.isfinite(t).all() for t in (*m.parameters(), *m.buffers())
                                   if t.is_floating_point()] or [torch.tensor(True)]).all())
        # sharded strategies: each rank checks its shard, and all must agree before a collective save
        return trainer.strategy.reduce_boolean_decision(finite, all=True)

    def _save_topk(self, trainer: Trainer, candidates: dict[str, torch.Tensor]) -> None:
        if self.save_top_k == 0:
            return
        if not self._finite(trainer):
            rank_zero_warn(f"LastAndBestCheckpoint: the model has non-finite weights at epoch {trainer.current_epoch}"
                           f", step {trainer.global_step}; not saved as top-k (best stays "
                           f"{self.best_model_path or 'unset'})")
            return
        if self.monitor is None:  # the newest state is "best"; save_top_k=1 keeps one such file
            replaced = self.best_model_path if self.save_top_k == 1 else None
            path = self.best_model_path = self._free_name(trainer, candidates, keep=self.best_model_path)
            self._write(trainer, path)
            self._remove_replaced(trainer, replaced, path)
            return
        current = candidates.get(self.monitor)
        if current is None:
            rank_zero_warn(f"LastAndBestCheckpoint(monitor={self.monitor!r}): no such metric was logged (logged: "
                           f"{sorted(candidates)}); no best file saved at step {trainer.global_step}")
            return
        if not self.check_monitor_top_k(trainer, current):
            if self.verbose:
                rank_zero_info(f"step {trainer.global_step}: {self.monitor!r} was not in top {self.save_top_k}")
            return
        k = len(self.best_k_models) + 1 if self.save_top_k == -1 else self.save_top_k
        replaced = self.kth_best_model_path if len(self.best_k_models) == k else None
        self.best_k_models.pop(replaced, None)
        if torch.isnan(current):  # never best
            current = torch.tensor(float("inf" if self.mode == "min" else "-inf"), device=current.device)
        path = self._free_name(trainer, candidates, keep=replaced)
        self.current_score = self.best_k_models[path] = current
        worst, best = (max, min) if self.mode == "min" else (min, max)
        if len(self.best_k_models) == k:
            self.kth_best_model_path = worst(self.best_k_models, key=self.best_k_models.get)
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        self.best_model_path = best(self.best_k_models, key=self.best_k_models.get)
        self.best_model_score = self.best_k_models[self.best_model_path]
        if self.verbose:
            rank_zero_info(f"step {trainer.global_step}: {self.monitor!r} reached {float(current):0.5f} (best "
                           f"{float(self.best_model_score):0.5f}), saving {path!r} as top {k}")
        self._write(trainer, path)  # the file it replaces goes only after this succeeded
        self._remove_replaced(trainer, replaced, path)

    def _save_last(self, trainer: Trainer, candidates: dict[str, torch.Tensor]) -> None:
        if self.save_last:
            path = self._free_name(trainer, candidates, self.CHECKPOINT_NAME_LAST, keep=self.last_model_path)
            replaced, self.last_model_path = self.last_model_path, path  # set first: it is part of the saved state
            self._write(trainer, path)
            self._remove_replaced(trainer, replaced, path)

    def _free_name(self, trainer: Trainer, candidates: dict[str, torch.Tensor], filename: str | None = None,
                   keep: str | None = None) -> str:
        """The file name for ``candidates``, with a ``-vN`` suffix while another file has it (``keep``: the file
        this save replaces may be overwritten)."""
        path, version = self.format_checkpoint_name(candidates, filename), self.STARTING_VERSION
        same = lambda a, b: a == b or (b is not None and _local_path(a) is not None and _local_path(b) is not None
                                       and os.path.realpath(a) == os.path.realpath(b))
        while self._version_counter and not same(path, keep) and self.file_exists(path, trainer):
            path = self.format_checkpoint_name(candidates, filename, ver=version)
            version += 1
        return path

    def _write(self, trainer: Trainer, path: str) -> None:
        trainer.save_checkpoint(path, self.save_weights_only)
        self._saved_step, self._saved_path = trainer.global_step, path
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _remove_replaced(self, trainer: Trainer, previous: str | None, current: str) -> None:
        """Remove ``previous``, the file a save replaced, unless it is the file just written or the one this run
        resumed from, or lies outside this callback's folder (remote paths: always removed)."""
        if not previous or previous == current:
            return
        if _local_path(previous) is not None:
            abspath, resumed = os.path.abspath, trainer.ckpt_path
            if (resumed is not None and abspath(previous) == abspath(resumed)
                    or Path(abspath(self.dirpath or ".")) not in Path(abspath(previous)).parents):
                return
        trainer.strategy.remove_checkpoint(previous)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._fitting:
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
