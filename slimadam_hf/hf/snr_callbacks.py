"""Trainer callbacks of the SNR tooling: record SNR during a full-Adam run, save an auto-snr run's rules."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

from ..optim.optimizer import unwrap_optimizer
from ..snr.auto import RULES_FILENAME, AutoSNRSlimAdamW
from ..snr.recorder import SNRRecorder
from ..snr.targets import SNRSchedule
from .callbacks import MetricsOnNextLogCallback

logger = logging.getLogger(__name__)

__all__ = ["AutoSNRCallback", "SNRCallback"]


class SNRCallback(TrainerCallback):
    """``transformers.TrainerCallback`` that records SNR during ``Trainer.train()``.

    Args:
        path: CSV path; default ``<output_dir>/snr.csv``.
        every, first: the schedule (measure at step ``first`` and every ``every`` optimizer steps).
        preset: preset used to find roles and splits (``"auto"`` from the model type).

    Train with ``optim="adamw_torch"`` (or SlimAdamW without compression). Only the main process
    writes. On resume, rows after the checkpoint's step are dropped and measuring goes on.
    """

    def __init__(self, path: str | Path | None = None, every: int = 100, first: int = 1, preset: Any = "auto") -> None:
        self.path = path
        self.schedule = SNRSchedule(every, first)
        self.preset = preset
        self.recorder: Optional[SNRRecorder] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if not state.is_world_process_zero or model is None:
            return
        path = Path(self.path) if self.path is not None else Path(args.output_dir) / "snr.csv"
        self.recorder = SNRRecorder(model, path, self.schedule, preset=self.preset, resume_step=state.global_step)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
        if self.recorder is not None and optimizer is not None:
            self.recorder.maybe_measure(optimizer, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        rec = self.recorder
        if rec is not None and rec.timings:
            logger.info(
                "SNR: %d measurements of %d tensors into %s, %.1f ms each on average",
                len(rec.timings), len(rec.targets), rec.path, 1000 * sum(rec.timings) / len(rec.timings),
            )


class AutoSNRCallback(MetricsOnNextLogCallback):
    """Saves the rules of an auto-snr run; does nothing for other optimizers.

    Writes ``<output_dir>/slimadam_auto_snr_rules.json`` when the switch happens (or at train begin when
    resuming after it), a copy into each checkpoint saved after it, and adds the new plan's totals
    (``slimadam/second_moment_savings`` ...) to the next log. Main process only.
    :func:`slimadam_hf.register` adds it to every ``Trainer``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._written_at: Optional[int] = None

    @staticmethod
    def _auto(optimizer: Any) -> Optional[AutoSNRSlimAdamW]:
        inner = unwrap_optimizer(optimizer)
        return inner if isinstance(inner, AutoSNRSlimAdamW) else None

    def _write(self, args: Any, state: Any, opt: AutoSNRSlimAdamW) -> None:
        if opt.switched_at is None or self._written_at == opt.switched_at:
            return
        self._written_at = opt.switched_at
        if opt.plan is not None:
            self._pending = opt.plan.totals()
        if state.is_world_process_zero and args.output_dir:
            path = opt.save_rules(Path(args.output_dir) / RULES_FILENAME)
            logger.info("auto-snr: rules written to %s (reuse them with --optim_args config=%s)", path, path)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: D102
        opt = self._auto(optimizer)
        self._written_at = None
        if opt is not None:
            self._write(args, state, opt)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):  # noqa: D102
        opt = self._auto(optimizer)
        if opt is not None:
            self._write(args, state, opt)

    def on_save(self, args, state, control, optimizer=None, **kwargs):  # noqa: D102
        opt = self._auto(optimizer)
        if opt is None or opt.switched_at is None or not state.is_world_process_zero or not args.output_dir:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            opt.save_rules(checkpoint / RULES_FILENAME)
