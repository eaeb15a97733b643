"""Run output: TensorBoard events, metrics.jsonl, and on stderr a progress bar on a terminal or one line
per log interval otherwise (progress: auto), a bar always (on), or nothing (off)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


class Progress:
    """What a person watching a run sees on stderr: a tqdm bar on a terminal, else one line per log interval
    (progress 'auto'); a bar always ('on'); nothing ('off'). Fed by the in-process logger, or by the driver of
    a Ray Train run from the rows rank 0 appends to metrics.jsonl."""

    def __init__(self, members: int, total_steps: int, start_step: int, progress: str) -> None:
        self.members = members
        self.total_steps = total_steps
        self.steps_done = 0
        tty = sys.stderr.isatty()
        self.lines = progress == "auto" and not tty  # no terminal (a log file, a job): a line per log interval
        self.bar = None
        if progress == "on" or (progress == "auto" and tty):
            from tqdm import tqdm
            try:  # a pseudo-terminal without a size (`script`, CI runners) reports 0x0: tqdm then hides its bar
                sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
            except (OSError, ValueError):
                sized = False
            self.bar = tqdm(total=total_steps, initial=start_step, unit="upd", file=sys.stderr,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24)

    def advance(self, n: int = 1) -> None:
        self.steps_done += n
        if self.bar is not None:
            self.bar.update(n)

    def show(self, row: dict[str, Any]) -> None:
        """A metrics.jsonl row: update the bar's losses and rate, or print the interval's line."""
        if self.bar is not None:
            shown = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("loss/")}
            ups = row.get("perf/updates_per_s")
            post = {k: f"{(v[0] if isinstance(v, list) else v):.3g}" for k, v in shown.items()}
            if ups is not None:
                post["upd/s"] = f"{ups:.0f}"
            self.bar.set_postfix(post, refresh=False)
        elif self.lines and "perf/updates_per_s" in row:
            print(self._line(row), file=sys.stderr, flush=True)

    def _line(self, row: dict[str, Any]) -> str:
        """'step 2000/10000 (20%)  loss/critic 0.53 ...  120 updates/s  eta 1m07s' (member means for K > 1)."""
        step = row["step"]
        parts = [f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)"]
        for name, v in row.items():
            if name.startswith("loss/"):
                v = sum(v) / len(v) if isinstance(v, list) else v
                parts.append(f"{name} {v:.4g}")
        ups = row["perf/updates_per_s"]
        if self.members > 1:
            parts.append(f"{ups:.3g} passes/s ({ups * self.members:.3g} member-updates/s, K={self.members}; "
                         f"losses are member means)")
        else:
            parts.append(f"{ups:.3g} updates/s")
        if ups > 0 and step < self.total_steps:  # at the interval's rate (start-up and evaluations excluded)
            parts.append(f"eta {_duration((self.total_steps - step) / ups)}")
        return "  ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunLogger:
    """TensorBoard events and metrics.jsonl of a run (written by rank 0), plus its Progress display."""

    def __init__(self, run_dir: Path, members: int, total_steps: int, start_step: int, progress: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.members = members
        self.start_step = start_step
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1)
        self.jsonl_path = run_dir / "metrics.jsonl"
        _truncate_after(self.jsonl_path, start_step)
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self.progress = Progress(members, total_steps, start_step, progress)

    @property
    def steps_done(self) -> int:
        """Updates finished by this process (0: nothing trained yet)."""
        return self.progress.steps_done

    def advance(self, n: int = 1) -> None:
        self.progress.advance(n)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """metrics: name -> per-member list (length K) or a scalar."""
        row: dict[str, Any] = {"step": step}
        for name, value in metrics.items():
            if isinstance(value, (list, tuple)):
                if self.members == 1:
                    self._scalar(name, value[0], step)
                    row[name] = value[0]
                else:
                    for k, v in enumerate(value):
                        self._scalar(f"{name}/m{k}", v, step)
                    row[name] = list(value)
            else:
                self._scalar(name, value, step)
                row[name] = value
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        self.progress.show(row)

    def _scalar(self, name: str, value: Any, step: int) -> None:
        if value is not None:
            self.writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        self.progress.close()
        self.writer.flush()
        self.writer.close()
        self.jsonl.close()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop the lines a crashed run wrote after the checkpoint it resumes from."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    os.replace(tmp, path)
