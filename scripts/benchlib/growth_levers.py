"""Two growth levers that ``growth_experiment.py`` measured and that did not pay there, so they stay out of the
library: growing depth (:class:`DepthGrowth`) and a warm-up of the new rows alone (:class:`NewRowsWarmup`). Both are
Lightning callbacks that work next to :class:`tokenformer_vision.GrowthCallback` on the same ``ImageClassifier``.
(Progressive resolution, which did pay, is :class:`tokenformer_vision.callbacks.ProgressiveResolution`.)
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from tokenformer_vision.callbacks import _eval_logits  # GrowthCallback's exactness check, reused


def spread(count: int, total: int) -> list[int]:
    """``count`` block indices spread evenly over ``range(total)``, the first included (3 of 6: 0, 2, 4)."""
    if not 1 <= count <= total:
        raise ValueError(f"need 1 ≤ count ≤ total, got {count} of {total}")
    return sorted({(i * total) // count for i in range(count)})


class DepthGrowth(L.Callback):
    """Trains ``start_depth`` of the model's blocks until epoch ``epoch``, then all of them, with the function
    preserved exactly.

    At setup the blocks left out (every other one for half the depth) move to ``model.pending_blocks``: they stay in
    the optimizer but run no forward, so they get no gradient and AdamW leaves them (and their moments) alone. Their
    output projections (``attn.proj`` and ``ffn`` value tokens) are zeroed, so that each one adds 0 to the residual
    stream: when they are put back into ``model.blocks`` at their places, the function is unchanged (``max|Δlogits|``
    is recorded in ``events``), and the zero values receive gradient from the first step on (zero-initialised
    residual branches). Running at the start of an epoch, it acts before a :class:`GrowthCallback` stage of the same
    epoch, which then widens all blocks together.
    """

    def __init__(self, epoch: int, start_depth: int, check_samples: int = 16) -> None:
        self.epoch, self.start_depth, self.check_samples = epoch, start_depth, check_samples
        self.events: list[dict[str, Any]] = []
        self._order: list[nn.Module] = []
        self._probe: torch.Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._order:
            return
        net = pl_module.model
        if getattr(pl_module, "ema", None) is not None:
            raise ValueError("DepthGrowth does not grow an EMA copy; train without ema_decay")
        self._order = list(net.blocks)
        active = spread(self.start_depth, len(self._order))
        pending = [b for i, b in enumerate(self._order) if i not in active]
        with torch.no_grad():
            for block in pending:
                block.attn.proj.value_param.zero_()
                block.ffn.value_param.zero_()
        net.blocks = nn.Sequential(*(self._order[i] for i in active))
        net.pending_blocks = nn.ModuleList(pending)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._probe is None:
            self._probe = batch[0][: self.check_samples].detach().clone()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.model
        if trainer.current_epoch < self.epoch or not hasattr(net, "pending_blocks"):
            return
        probe = None if self._probe is None else self._probe.to(next(net.parameters()).device)
        before = None if probe is None else _eval_logits(net, probe)
        net.blocks = nn.Sequential(*self._order)
        del net.pending_blocks
        delta = float("nan") if probe is None else float((_eval_logits(net, probe) - before).abs().max())
        self.events.append({"kind": "depth", "epoch": trainer.current_epoch, "step": trainer.global_step,
                            "depth_before": self.start_depth, "depth_after": len(self._order),
                            "max_abs_dlogits": delta})


class NewRowsWarmup(L.Callback):
    """For ``steps`` optimizer steps after each growth of ``growth`` (a :class:`GrowthCallback`), only the appended
    parameter-token rows move: every other weight is put back to its value before the step (Adam's moments of the
    old rows still track their gradients). A warm-up of the new rows alone, so that they catch up with the trained
    rows before those move again; the callback's own re-warm then continues for all weights."""

    def __init__(self, growth: Any, steps: int) -> None:
        self.growth, self.steps = growth, steps
        self._hooks: list[Any] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (parameter, its value before the step, rows kept)

        def frozen() -> bool:
            events = self.growth.events
            return bool(events) and trainer.global_step - events[-1]["step"] < self.steps

        def pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if not frozen():
                return
            params = dict(pl_module.model.named_parameters())
            new_from = self.growth.new_rows  # parameter name → first appended row
            saved[:] = [(p, p.detach().clone(), new_from.get(name, p.shape[0])) for name, p in params.items()]

        @torch.no_grad()
        def post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for param, before, rows in saved:
                param[:rows].copy_(before[:rows])
            saved.clear()

        for optimizer in trainer.optimizers:
            self._hooks += [optimizer.register_step_pre_hook(pre_hook), optimizer.register_step_post_hook(post_hook)]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        while self._hooks:
            self._hooks.pop().remove()
