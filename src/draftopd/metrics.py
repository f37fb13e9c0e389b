"""A training run's ``metrics.jsonl``: one JSON object per line, appended by ``Metrics`` (rank 0), read by
``read_metrics`` (the trainers on resume, the demo's report and figures): one writer, one reader."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from draftopd import DraftopdError
from draftopd.atomic import write_text, writing

log = logging.getLogger(__name__)


class Metrics:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, out: Path) -> None:
        self.path = out / "metrics.jsonl"
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:  # pragma: no cover - tensorboard is a dependency, but stay usable without it
            pass

    def truncate(self, step: int) -> None:
        """Forget rows after ``step`` (logged by a run that was killed before its next checkpoint; -1 = all), and
        a torn last line (a kill in the middle of an append)."""
        keep = [r for r in self.read() if r["step"] <= step] if step >= 0 else []
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))  # atomic: never half a log

    def log(self, step: int, **values) -> None:
        with writing(self.path), self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def read(self) -> list[dict]:
        """The rows; a torn last line (no newline, not JSON) is dropped, any other bad line is a one-line error."""
        return read_metrics(self.path)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DraftopdError(f"{path}: cannot be read ({e.strerror or e})") from None
    lines = text.split("\n")
    rows = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except (json.JSONDecodeError, ValueError, RecursionError):
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            if i == len(lines):  # the last line, without its newline: an append cut short
                log.warning("%s:%d: a torn last line, dropped", path, i)
                break
            raise DraftopdError(f"{path}:{i}: not a metrics row; remove the line or choose another out")
        rows.append(row)
    return rows
