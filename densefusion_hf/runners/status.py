"""``df-hf status``: what a work directory holds, per stage."""

from __future__ import annotations

from pathlib import Path

from densefusion_hf.errors import UserError
from densefusion_hf.runners.manifest import MANIFEST_NAME, Manifest
from densefusion_hf.recipe import STAGE_ORDER
from densefusion_hf.runners.report import stage_summary


def collect_status(workdir: Path) -> dict:
    workdir = Path(workdir)
    if not (workdir / MANIFEST_NAME).exists():
        raise UserError(f"{workdir} is not a work directory (no {MANIFEST_NAME}). "
                        f"Pass the folder given to `df-hf build --workdir` (default: work/<recipe name>).")
    manifest = Manifest(workdir)
    stages = []
    previous_done = None
    for name in STAGE_ORDER:
        entry = manifest.stage(name)
        if entry is None:
            continue
        summary = stage_summary(workdir, name)
        total = entry.get("shards_total")
        if total is None:
            total = 1 if name == "publish" else previous_done
        summary.update(shards_total=total, complete=bool(entry.get("complete")))
        if name == "publish":
            summary["dataset"] = entry.get("dataset")
        stages.append(summary)
        previous_done = summary["shards_done"]
    return {"workdir": str(workdir), "recipe": manifest.data.get("recipe", {}),
            "package_version": manifest.data.get("package_version"), "stages": stages}


def format_status(report: dict) -> str:
    recipe = report["recipe"]
    lines = [f"{report['workdir']}: recipe {recipe.get('name')} {recipe.get('version')} "
             f"({recipe.get('path')}, sha256 {str(recipe.get('sha256'))[:12]}), "
             f"densefusion-hf {report.get('package_version')}", ""]
    header = f"{'stage':10s} {'shards':>13s} {'rows in':>10s} {'kept':>10s} {'dropped':>10s}"
    lines += [header, "-" * len(header)]
    for s in report["stages"]:
        total = "?" if s["shards_total"] is None else s["shards_total"]
        state = "done" if s["complete"] else "partial"
        lines.append(f"{s['name']:10s} {str(s['shards_done']) + '/' + str(total) + ' ' + state:>13s} "
                     f"{s['rows_in']:>10d} {s['rows_out']:>10d} {s['rows_dropped']:>10d}")
    reasons = [(s["name"], reason, count) for s in report["stages"] for reason, count in s["dropped"].items()]
    if reasons:
        lines += ["", "dropped rows by reason:"]
        lines += [f"  {stage:10s} {reason:24s} {count:>8d}" for stage, reason, count in reasons]
    for s in report["stages"]:
        if s.get("dataset"):
            lines += ["", f"dataset: {s['dataset']}"]
    return "\n".join(lines)
