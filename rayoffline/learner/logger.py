"""Run output: TensorBoard events, metrics.jsonl and a terminal progress bar (quiet when not a terminal)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(self, run_dir: Path, members: int, total_steps: int, start_step: int, progress: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.members = members
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1)
        self.jsonl_path = run_dir / "metrics.jsonl"
        _truncate_after(self.jsonl_path, start_step)
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        show = progress == "on" or (progress == "auto" and sys.stderr.isatty())
        self.bar = None
        if show:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="upd", dynamic_ncols=True, file=sys.stderr)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

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
        if self.bar is not None:
            shown = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("loss/")}
            ups = row.get("perf/updates_per_s")
            post = {k: f"{(v[0] if isinstance(v, list) else v):.3g}" for k, v in shown.items()}
            if ups is not None:
                post["upd/s"] = f"{ups:.0f}"
            self.bar.set_postfix(post, refresh=False)

    def _scalar(self, name: str, value: Any, step: int) -> None:
        if value is not None:
            self.writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.flush()
        self.writer.close()
        self.jsonl.close()


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
