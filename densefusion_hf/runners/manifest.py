"""WORKDIR/manifest.json: what built the work directory, so a rerun can tell whether it may resume.

It records the recipe (path and sha256 of its bytes), the package version, and for each stage the
parameters that decide its output, with a fingerprint that chains the upstream stage's fingerprint:
changing a fetch setting makes both fetch and publish stale, changing a publish setting only publish.
Settings that do not change the output (process counts, timeouts) are left out of the fingerprint.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

from densefusion_hf import __version__
from densefusion_hf.errors import UserError
from densefusion_hf.stages.shards import atomic_write_json

MANIFEST_NAME = "manifest.json"


def fingerprint(params: dict, upstream: str | None) -> str:
    blob = json.dumps({"params": params, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def describe_changes(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for every setting that differs."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if old_flat.get(key, "(unset)") != new_flat.get(key, "(unset)"):
            changes.append(f"{key}: {old_flat.get(key, '(unset)')!r} -> {new_flat.get(key, '(unset)')!r}")
    return changes


def content_checksum(data: dict) -> str:
    """SHA-256 of the manifest's content without its own checksum field; detects edits by hand."""
    body = {k: v for k, v in data.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Manifest:
    def __init__(self, workdir: Path):
        self.path = Path(workdir) / MANIFEST_NAME
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"{self.path} is not valid JSON ({exc}). The work directory is damaged: "
                                f"rebuild it with --fresh.") from None
            if not isinstance(self.data, dict) or not isinstance(self.data.get("stages"), dict):
                raise UserError(f"{self.path} has no 'stages' table; it was not written by df-hf. Restore it, "
                                f"or rebuild with --fresh.")
            recorded = self.data.get("checksum")
            if recorded is not None and recorded != content_checksum(self.data):
                raise UserError(f"{self.path} was edited by hand (its content no longer matches the checksum "
                                f"it was saved with), so the settings it records for each stage cannot be "
                                f"trusted. Undo the edit, or rebuild with --fresh.")
        else:
            self.data = {"created": _now(), "stages": {}}

    def stage(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def check(self, name: str, params: dict, fp: str, has_outputs: bool, workdir: Path) -> None:
        """Refuse to resume a stage whose finished outputs came from other settings."""
        recorded = self.stage(name)
        if not has_outputs or (recorded is not None and recorded.get("fingerprint") == fp):
            return
        if recorded is None:
            raise UserError(f"{workdir} has outputs of stage '{name}' that its manifest does not describe, so "
                            f"they cannot be trusted. Rebuild with --fresh, or use another --workdir.")
        changes = describe_changes(recorded.get("params", {}), params)
        what = ("; ".join(changes) if changes
                else "an earlier stage it reads from changed")
        raise UserError(
            f"The recipe changed since {workdir} was built: stage '{name}' has finished shards made with "
            f"other settings ({what}). Resuming would mix old and new outputs. Rebuild with --fresh "
            f"(everything), or `--only {name} --fresh` and then the stages after it, or use another --workdir."
        )

    def record(self, name: str, params: dict, fp: str, **info) -> None:
        entry = self.data["stages"].setdefault(name, {})
        entry.update(params=params, fingerprint=fp, **info)
        self.save()

    def set_recipe(self, recipe) -> None:
        self.data["recipe"] = {"name": recipe.name, "path": str(recipe.path), "sha256": recipe.sha256,
                               "version": recipe.version}
        self.data["package_version"] = __version__
        self.data["updated"] = _now()
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data["checksum"] = content_checksum(self.data)
        atomic_write_json(self.path, self.data)
