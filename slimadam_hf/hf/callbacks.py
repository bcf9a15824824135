"""What a ``Trainer`` user sees of SlimAdam: a plan summary, logged metrics, the plan as JSON."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

from ..distributed.ranks import is_main_process
from ..optim.optimizer import SlimAdamW, unwrap_optimizer
from ..rules.plan import CompressionPlan

logger = logging.getLogger("slimadam_hf.trainer")

PLAN_FILENAME = "slimadam_plan.json"


class _LastResortHandler(logging.StreamHandler):
    """Prints ``slimadam_hf`` INFO records to stderr while nothing else is set up to show them.

    Once the application configures logging (``logging.basicConfig`` in an HF script), records
    propagate to its handlers and this one filters them out, so nothing prints twice (and
    :func:`~slimadam_hf.rules.render.log_layout` sees where they do go).
    """

    def filter(self, record: logging.LogRecord) -> Any:
        return not logging.getLogger().handlers and super().filter(record)


def ensure_visible_logging() -> None:
    """Show ``slimadam_hf`` INFO messages (plan summary, AdamW-checkpoint conversion) by default.

    Leaves an explicitly set level of the ``slimadam_hf`` logger alone.
    """
    package_logger = logging.getLogger("slimadam_hf")
    if package_logger.level == logging.NOTSET:
        package_logger.setLevel(logging.INFO)
    if not any(isinstance(h, _LastResortHandler) for h in package_logger.handlers):
        handler = _LastResortHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[slimadam] %(message)s"))
        package_logger.addHandler(handler)


def log_plan_summary(optimizer: SlimAdamW) -> None:
    """Log the summary of ``optimizer.plan`` once, on the main process."""
    plan: Optional[CompressionPlan] = getattr(optimizer, "plan", None)
    if plan is None or getattr(optimizer, "_slimadam_summary_logged", False):
        return
    optimizer._slimadam_summary_logged = True
    if is_main_process():
        ensure_visible_logging()
        logger.info("%s", plan.render(by="role", logger=logger).rstrip())


def unwrap_slimadam(optimizer: Any) -> Optional[SlimAdamW]:
    """The :class:`SlimAdamW` inside an accelerate/DeepSpeed wrapper, or ``None``."""
    inner = unwrap_optimizer(optimizer)
    return inner if isinstance(inner, SlimAdamW) else None


class MetricsOnNextLogCallback(TrainerCallback):
    """Adds ``self._pending`` metrics to the next Trainer log (and its ``log_history`` entry), once."""

    def __init__(self) -> None:
        self._pending: Optional[dict[str, float]] = None

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        if self._pending is None or logs is None:
            return
        metrics, self._pending = self._pending, None
        logs.update(metrics)
        # Trainer.log appended a copy of `logs` to the history before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


class SlimAdamCallback(MetricsOnNextLogCallback):
    """Makes a SlimAdamW run visible; does nothing for other optimizers.

    * at train begin (main process): logs the plan summary if it was not logged when the optimizer was
      created, and writes the per-parameter plan to ``output_dir/slimadam_plan.json``;
    * at the first log of each ``train()`` call: adds ``slimadam/second_moment_savings``,
      ``slimadam/state_bytes``, ``slimadam/adamw_state_bytes`` and ``slimadam/state_ratio_vs_adamw`` to
      the logged metrics (so W&B, TensorBoard and ``trainer_state.json`` have them).

    :func:`slimadam_hf.register` adds it to every ``Trainer``; without ``register()`` pass
    ``callbacks=[SlimAdamCallback()]``.
    """

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: D102
        slim = unwrap_slimadam(optimizer)
        plan = getattr(slim, "plan", None)
        self._pending = None
        if plan is None:
            return
        self._pending = plan.totals()
        log_plan_summary(slim)
        if state.is_world_process_zero and args.output_dir:
            path = Path(args.output_dir) / PLAN_FILENAME
            path.parent.mkdir(parents=True, exist_ok=True)
            plan.save_json(path)
            logger.debug("SlimAdam plan written to %s", path)

__all__ = [
    "MetricsOnNextLogCallback",
    "PLAN_FILENAME",
    "SlimAdamCallback",
    "ensure_visible_logging",
    "log_plan_summary",
    "unwrap_slimadam",
]
