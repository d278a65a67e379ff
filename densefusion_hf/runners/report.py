"""Per-stage totals from the shards' stats files: for ``df-hf status`` and the dataset card."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from densefusion_hf.stages.shards import StageDir


def stage_summary(workdir: Path, stage: str) -> dict:
    """Rows in / kept / dropped (by reason) over the stage's finished shards."""
    stats = StageDir(workdir, stage).all_stats()
    dropped: Counter = Counter()
    for s in stats:
        dropped.update(s.get("dropped", {}))
    return {
        "name": stage,
        "shards_done": len(stats),
        "rows_in": sum(s.get("rows_in", 0) for s in stats),
        "rows_out": sum(s.get("rows_out", 0) for s in stats),
        "rows_dropped": sum(s.get("rows_dropped", 0) for s in stats),
        "dropped": dict(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
