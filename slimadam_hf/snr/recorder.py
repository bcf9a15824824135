"""Record the SNR of Adam's second moment on a schedule into the authors' CSV format, from any loop."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .rules import CSV_COLUMNS
from .targets import SNRSchedule, measure_snr, snr_targets

__all__ = ["SNRRecorder"]


class SNRRecorder:
    """Measure on a schedule and append rows to a CSV; usable from any training loop.

    >>> rec = SNRRecorder(model, "snr.csv")                # doctest: +SKIP
    >>> for step in range(1, n + 1):                       # doctest: +SKIP
    ...     loss.backward(); opt.step(); opt.zero_grad()
    ...     rec.maybe_measure(opt, step)

    ``timings`` holds the wall time (seconds, device-synchronised) of each measurement.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | Path,
        schedule: SNRSchedule = SNRSchedule(),
        plan: Any = None,
        preset: Any = "auto",
        resume_step: int = 0,
    ) -> None:
        self.targets = snr_targets(model, plan, preset)
        self.path = Path(path)
        self.schedule = schedule
        self.timings: list[float] = []
        self._warned: set[str] = set()
        self._start_file(resume_step)
        self.write_roles()

    def _start_file(self, resume_step: int) -> None:
        """New file; on resume keep the rows up to ``resume_step`` and drop later ones."""
        kept: list[dict[str, str]] = []
        if resume_step > 0 and self.path.exists():
            with self.path.open(newline="") as fh:
                kept = [r for r in csv.DictReader(fh) if int(float(r["step"])) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)

    def write_roles(self) -> Path:
        """``<csv>.roles.json``: key -> role and fan_in/fan_out dims (for ``rules --by-role``)."""
        info = {
            t.key: {
                "role": t.role,
                "fan_in": list(t.fan_in) if t.fan_in is not None else None,
                "fan_out": list(t.fan_out) if t.fan_out is not None else None,
            }
            for t in self.targets
        }
        path = self.path.with_name(self.path.name + ".roles.json")
        path.write_text(json.dumps(info, indent=1) + "\n")
        return path

    def measure(self, optimizer: Any, step: int) -> list[dict[str, Any]]:
        """Measure now and append to the CSV; returns the rows."""
        t0 = time.perf_counter()
        rows = measure_snr(optimizer, self.targets, step, self._warned)  # ends with one host sync
        self.timings.append(time.perf_counter() - t0)
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=CSV_COLUMNS).writerows(rows)
        return rows

    def maybe_measure(self, optimizer: Any, step: int) -> Optional[list[dict[str, Any]]]:
        """:meth:`measure` if the schedule says so at ``step`` (optimizer steps done so far)."""
        return self.measure(optimizer, step) if self.schedule(step) else None
