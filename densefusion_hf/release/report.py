"""The card's per-zip-shard table of a release build, summed from fetch's per-shard stats."""

from __future__ import annotations

from densefusion_hf.recipe import Recipe
from densefusion_hf.release.images import COUNTS


def release_summary(recipe: Recipe, fetch_stats: list[dict]) -> dict:
    """The release (repo, revision, config) and, per zip shard in name order: present, SHA-256 matches,
    central directory (ok, or broken and the members read from their local headers), rows, members read,
    missing, corrupt, repaired from the URL, lost."""
    release = recipe.source.release
    shards: dict[str, dict] = {}
    for stats in fetch_stats:
        for path, counts in (stats.get("release") or {}).items():
            entry = shards.setdefault(path, dict.fromkeys(COUNTS, 0))
            for name in COUNTS:
                entry[name] += counts[name]
            entry["present"], entry["sha256_matches"] = counts["present"], counts["sha256_matches"]
            # Every fetch shard opens the same file, so they agree; one that never opened it says None.
            entry["central_directory"] = entry.get("central_directory") or counts.get("central_directory")
    return {"repo": release.repo, "revision": release.revision, "config": release.config,
            "caption_model": release.caption_model,
            "shards": [dict(zip=path, **shards[path]) for path in sorted(shards)],
            "totals": {name: sum(entry[name] for entry in shards.values()) for name in COUNTS}}
