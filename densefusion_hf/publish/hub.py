"""Pushing a published dataset folder to a Hub dataset repo, as one version of one or more configs.

The plan compares the local files with the repo's (SHA-256 of LFS files, git blob ids of the others), so
a push uploads only what changed; the data goes in bounded commits, then the card, the charts and the
removal of the config's stale files go in a last commit, and the version is tagged ``vX.Y.Z``.  An
interrupted push, run again, finds the committed files in place and the uploaded-but-uncommitted ones
already stored, so it sends only what is missing.  The card is rendered for the repo at push time: it
lists the repo's other configs too, from their ``assets/CONFIG/build.json``.

Tokens come from huggingface_hub (``HF_TOKEN`` or ``hf auth login``); nothing here prints or logs them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from densefusion_hf.publish.build_info import BUILD_INFO, file_sha256, version_key
from densefusion_hf.publish.cards import CARD, card_for, config_infos
from densefusion_hf.console import progress
from densefusion_hf.errors import UserError

# The Hub limits a commit's size; these keep each well inside and bound what a failed commit repeats.
COMMIT_FILES = 20
COMMIT_BYTES = 5_000_000_000


@dataclass
class LocalFile:
    path: str                   # in the repo
    source: Path | bytes        # what is uploaded
    size: int
    sha256: str


@dataclass
class PushPlan:
    repo_id: str
    revision: str
    version: str
    configs: list[str]
    upload: list[LocalFile] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    repo_exists: bool = True
    tag_exists_at: str | None = None
    head: str | None = None          # the commit the plan was made against
    changes_tagged: bool = False     # the push would give the existing version other data

    @property
    def upload_bytes(self) -> int:
        return sum(f.size for f in self.upload)

    def describe(self) -> str:
        lines = [f"{', '.join(self.configs)} version {self.version} to "
                 f"{self.repo_id} ({self.revision}{'' if self.repo_exists else ', a new repo'}):",
                 f"  upload {len(self.upload)} files ({_size(self.upload_bytes)}), "
                 f"{len(self.unchanged)} unchanged, delete {len(self.delete)}"]
        lines += [f"  + {f.path} ({_size(f.size)})" for f in self.upload]
        lines += [f"  - {path}" for path in self.delete]
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def git_blob_id(data: bytes) -> str:
    """The id git (and the Hub) gives a regular file's content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def _remote_files(api, repo_id: str, revision: str) -> dict:
    """path -> (sha256 of an LFS file or None, git blob id, size) at ``revision``; empty when absent."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        entries = api.list_repo_tree(repo_id, repo_type="dataset", revision=revision, recursive=True)
        return {e.path: (e.lfs.sha256 if e.lfs else None, e.blob_id, e.size)
                for e in entries if isinstance(e, RepoFile)}
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return {}


def _local_files(folder: Path, infos: list[dict]) -> list[LocalFile]:
    """Each config's data files and assets (the card is added at push time).  A data file's SHA-256 comes
    from build.json unless its size no longer matches, in which case it is hashed again."""
    files = []
    for info in infos:
        config = info["config"]
        listed = {f["path"]: f for f in info["files"]}
        paths = sorted((folder / config).glob("train-*.parquet")) + \
            sorted(p for p in (folder / "assets" / config).iterdir() if p.is_file())
        for path in paths:
            relative, size = path.relative_to(folder).as_posix(), path.stat().st_size
            known = listed.get(relative)
            digest = known["sha256"] if known and known["bytes"] == size else file_sha256(path)
            files.append(LocalFile(relative, path, size, digest))
    return files


def _unchanged(local: LocalFile, remote: tuple | None) -> bool:
    if remote is None:
        return False
    sha256, blob_id, size = remote
    if sha256 is not None:
        return sha256 == local.sha256
    data = local.source if isinstance(local.source, bytes) else Path(local.source).read_bytes()
    return blob_id == git_blob_id(data)


def _remote_infos(api, repo_id: str, revision: str, remote: dict, skip: set[str]) -> list[dict]:
    """build.json of the repo's other configs, so the card keeps describing them.  Configs the repo's card
    lists without one (made by another tool) would vanish from the card: refused, with the reason."""
    from huggingface_hub import DatasetCard, hf_hub_download

    infos = []
    for path in sorted(remote):
        parts = path.split("/")
        if len(parts) == 3 and parts[0] == "assets" and parts[2] == BUILD_INFO and parts[1] not in skip:
            local = hf_hub_download(repo_id, path, repo_type="dataset", revision=revision, token=api.token)
            infos.append(json.loads(Path(local).read_text(encoding="utf-8")))
    if CARD in remote:
        card = DatasetCard.load(hf_hub_download(repo_id, CARD, repo_type="dataset", revision=revision,
                                                token=api.token))
        known = skip | {info["config"] for info in infos}
        foreign = sorted(c.get("config_name", "default") for c in card.data.to_dict().get("configs") or []
                         if c.get("config_name", "default") not in known)
        if foreign:
            raise UserError(f"{repo_id} ({revision}) has configs that were not published by df-hf "
                            f"({', '.join(foreign)}: no assets/CONFIG/{BUILD_INFO}); the card this push writes "
                            f"would no longer list them. Push to another repo, or remove those configs first.")
    return infos


def plan_push(folder: Path, repo_id: str, *, version: str | None = None, revision: str | None = None,
              token: str | None = None) -> PushPlan:
    """What a push of ``folder`` to ``repo_id`` would upload, keep and delete; changes nothing."""
    from huggingface_hub.errors import RepositoryNotFoundError

    folder = Path(folder)
    infos = config_infos(folder)
    if not infos:
        raise UserError(f"{folder}: not a published dataset folder (no assets/*/{BUILD_INFO}). Build it with "
                        f"`df-hf build RECIPE` first; publish pushes WORKDIR/dataset.")
    api = _api(token)
    configs = [info["config"] for info in infos]
    versions = {info["recipe"]["version"] for info in infos}
    version = version or max(versions, key=version_key)
    branch = revision or "main"
    try:
        exists = api.repo_exists(repo_id, repo_type="dataset")
    except RepositoryNotFoundError:
        exists = False
    refs = api.list_repo_refs(repo_id, repo_type="dataset") if exists else None
    # A new branch starts from main: plan against main's files, which it will hold.
    base = branch if refs is None or branch in {b.name for b in refs.branches} else "main"
    remote = _remote_files(api, repo_id, base) if exists else {}
    others = _remote_infos(api, repo_id, base, remote, set(configs)) if remote else []
    # Configs in name order: the card (its title comes from the first) does not change with push order.
    card = card_for(sorted(infos + others, key=lambda i: i["config"]), load_path=repo_id, version=version,
                    on_hub=True)
    card_bytes = str(card).encode("utf-8")
    local = _local_files(folder, infos)
    local.append(LocalFile(CARD, card_bytes, len(card_bytes), hashlib.sha256(card_bytes).hexdigest()))
    plan = PushPlan(repo_id, branch, version, configs, repo_exists=exists)
    plan.head = api.dataset_info(repo_id, revision=base).sha if exists else None
    for item in local:
        (plan.unchanged.append(item.path) if _unchanged(item, remote.get(item.path)) else plan.upload.append(item))
    ours = {item.path for item in local}
    owned = tuple(f"{c}/" for c in configs) + tuple(f"assets/{c}/" for c in configs)
    plan.delete = sorted(p for p in remote if p.startswith(owned) and p not in ours)
    if refs is not None:
        plan.tag_exists_at = {t.name: t.target_commit for t in refs.tags}.get(f"v{version}")
    if plan.tag_exists_at:
        # The card may mention configs pushed since; the version's own data and assets must not change.
        tagged = _remote_files(api, repo_id, plan.tag_exists_at)
        plan.changes_tagged = (any(not _unchanged(f, tagged.get(f.path)) for f in local if f.path != CARD)
                               or any(p.startswith(owned) and p not in ours for p in tagged))
    return plan


def _batches(files: list[LocalFile], max_files: int, max_bytes: int) -> list[list[LocalFile]]:
    batches, current, size = [], [], 0
    for item in files:
        if current and (len(current) == max_files or size + item.size > max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    return batches + ([current] if current else [])


def _addition(item: LocalFile):
    """The upload of one file, with the SHA-256 publish already computed (huggingface_hub would read the
    file once more for it; a file changed since is refused by the server's check)."""
    from huggingface_hub import CommitOperationAdd

    operation = CommitOperationAdd(item.path, item.source)
    if not isinstance(item.source, bytes):
        operation.upload_info.sha256 = bytes.fromhex(item.sha256)
    return operation


def _is_network_error(exc: Exception) -> bool:
    """A connection or timeout error of the HTTP client huggingface_hub uses (httpx or its fork)."""
    return type(exc).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore"}


def _hub_error(exc: Exception, repo_id: str) -> UserError:
    """The server's own message, which names what was wrong; never the request's headers."""
    from huggingface_hub.errors import HfHubHTTPError

    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    hint = {401: " Log in with `hf auth login` or set HF_TOKEN to a token with write access.",
            403: f" Your token cannot write to {repo_id}; check the organisation's permissions."}.get(status, "")
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"Pushing to {repo_id} failed: {first_line}.{hint} Files already committed stay; run the "
                     f"same command again to push only what is missing.")


def push(folder: Path, repo_id: str, *, version: str | None = None, private: bool = False,
         revision: str | None = None, create_pr: bool = False, token: str | None = None,
         commit_files: int = COMMIT_FILES, commit_bytes: int = COMMIT_BYTES, show_progress: bool = True) -> dict:
    """Push ``folder`` (a published dataset) to ``repo_id``; returns what was done."""
    from huggingface_hub import CommitOperationDelete
    from huggingface_hub.errors import HfHubHTTPError

    try:
        plan = plan_push(folder, repo_id, version=version, revision=revision, token=token)
        api = _api(token)
        tag = f"v{plan.version}"
        if plan.changes_tagged:
            raise UserError(f"{repo_id} already has version {tag} (commit {plan.tag_exists_at[:10]}) and this push "
                            f"would change it. Publish under a new version (--version, or the recipe's version "
                            f"field), so that loads of {tag} keep giving the same data.")
        if not plan.repo_exists:
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
        ops = {f.path: _addition(f) for f in plan.upload}
        # One preupload for every large file: parallel uploads, and an interrupted push keeps what was sent.
        large = [ops[f.path] for f in plan.upload if not isinstance(f.source, bytes)]
        if large:
            api.preupload_lfs_files(repo_id, large, repo_type="dataset", revision=plan.revision)
        data = [f for f in plan.upload if f.path != CARD and not f.path.startswith("assets/")]
        deletions = [CommitOperationDelete(p) for p in plan.delete]
        if len(data) <= commit_files and sum(f.size for f in data) <= commit_bytes:
            commits = [([ops[f.path] for f in plan.upload] + deletions, f"{', '.join(plan.configs)} {tag}")]
        else:
            batches = _batches(data, commit_files, commit_bytes)
            commits = [([ops[f.path] for f in batch], f"{', '.join(plan.configs)} {tag}: data, part {index} of "
                                                       f"{len(batches)}") for index, batch in enumerate(batches, 1)]
            commits.append(([ops[f.path] for f in plan.upload if f not in data] + deletions,
                            f"{', '.join(plan.configs)} {tag}: card and assets"))
        target, pr_url, made, head = plan.revision, None, 0, plan.head
        with progress(len(commits), "push", "commit", show_progress) as bar:
            for operations, message in commits:
                if operations:
                    # The first commit must follow the head the plan was made against (no push in between).
                    info = api.create_commit(repo_id, operations, repo_type="dataset", revision=target,
                                             create_pr=create_pr and pr_url is None, commit_message=message,
                                             parent_commit=None if create_pr or made else head)
                    target, pr_url, head = info.pr_revision or target, info.pr_url or pr_url, info.oid
                    made += 1
                bar.update(1)
        tagged = None
        # A pull request is tagged once merged: pushing again to main then tags it, uploading nothing.
        if not create_pr and plan.tag_exists_at is None:
            head = head or api.dataset_info(repo_id, revision=target).sha  # a new repo: its first commit
            api.create_tag(repo_id, repo_type="dataset", tag=tag, revision=head,
                           tag_message=f"{', '.join(plan.configs)} version {plan.version}")
            tagged = tag
    except Exception as exc:
        if isinstance(exc, (HfHubHTTPError, OSError)) or _is_network_error(exc):
            raise _hub_error(exc, repo_id) from None
        raise
    return {"repo_id": repo_id, "revision": target, "version": plan.version, "commits": made,
            "uploaded": [f.path for f in plan.upload], "uploaded_bytes": plan.upload_bytes,
            "deleted": plan.delete, "unchanged": len(plan.unchanged), "tag": tagged, "pr_url": pr_url}
