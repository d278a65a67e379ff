"""The Ray runner: the same stages and the same work directory, their shards spread over a Ray cluster.

``build`` is the local runner's ``build`` with a ``RayExecutor``: planning, fingerprints, the lock and the
manifest stay on the driver, and every ``ctx.executor.map`` call of a stage becomes Ray work:

- a stage whose session is costly to enter (``session_per_worker``: embed and caption load a model, fetch starts
  img2dataset's worker processes) runs in a pool of actors, each entering the stage's ``session`` once (the
  model loaded on the GPU the recipe's ``runner`` section gives it), then taking shards, and leaving the
  session when the stage ends;
- everything else runs as Ray tasks (``runner.<stage>.cpus`` / ``gpus`` each).

Workers read and write shards in the work directory, which every node must mount at the same path; only
shard names, settings and stats travel through Ray, never image bytes.  A shard whose worker dies is run
again on another worker, ``runner.max_retries`` times, then the build stops naming the shard; its done
markers make a rerun of the same command resume.
"""

from __future__ import annotations

import contextlib
import copy
import os
import secrets
import socket
from pathlib import Path

from densefusion_hf.errors import UserError
from densefusion_hf.recipe import Recipe, Workers
from densefusion_hf.runners.executor import SerialExecutor

#: Where each stage's runner setting ``batch_size`` goes, for the stages that have one.
BATCH_SIZE_FIELDS = {"embed": ("embed",), "caption": ("caption",)}


#: Ray, started here on one machine, listens on loopback only (the flag's name is Ray's: on Linux it keeps a
#: local instance single-node, bound to 127.0.0.1, rather than on the machine's network address).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes of Ray's own retries, when nothing listens at HOST:PORT."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address}: expected auto, HOST:PORT or ray://HOST:10001.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc}). Start one "
                        f"with `ray start --head` (or check the address and port), or drop --ray-address to "
                        f"start a local Ray.") from None


def connect(address: str | None, num_cpus: int | None = None):
    """Join the cluster at ``address`` ('auto', 'ray://HOST:10001', 'HOST:6379'), or start a local Ray."""
    if address is None:
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    try:
        import ray
    except ImportError:
        raise UserError("--runner ray needs Ray: pip install 'densefusion-hf[ray]' (or 'ray[data]').") from None
    if ray.is_initialized():
        return ray
    if address is not None:
        _check_reachable(address)
    try:
        if address is None:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - Ray raises many kinds here, all meaning "cannot connect"
        raise UserError(f"--ray-address {address}: cannot connect to Ray ({type(exc).__name__}: {exc}). "
                        f"Check the address, or drop --ray-address to start a local Ray.") from None
    return ray


def _stage_ctx(ctx, stage_name: str, workers: Workers):
    """The context a worker gets: the recipe with the runner's batch size for this stage applied."""
    ctx = copy.copy(ctx)
    if workers.batch_size and stage_name in BATCH_SIZE_FIELDS:
        ctx.recipe = copy.deepcopy(ctx.recipe)
        section = getattr(ctx.recipe, BATCH_SIZE_FIELDS[stage_name][0])
        if section is not None:
            section.batch_size = workers.batch_size
    ctx.executor = None
    return ctx


def _call(ctx, stage, method: str, item, args: tuple, session: bool):
    """One piece of a stage's work, in a Ray task."""
    ctx.executor = SerialExecutor()
    work = getattr(stage, method)
    if not session:
        return work(ctx, item, *args)
    with stage.session(ctx):
        return work(ctx, item, *args)


class _StageWorker:
    """A Ray actor holding one stage's session (its model, its worker processes) for all the shards it is
    given, until ``close``."""

    def __init__(self, ctx, stage):
        ctx.executor = SerialExecutor()
        self.ctx, self.stage = ctx, stage
        self.session = stage.session(ctx)
        self.session.__enter__()

    def call(self, method: str, item, args: tuple):
        return getattr(self.stage, method)(self.ctx, item, *args)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        """Leave the session: what it started (img2dataset's workers, a server) stops with it."""
        self.session.__exit__(None, None, None)


def _probe(path: str, token: str) -> tuple[str, bool, str]:
    """Run on one node: can it read the driver's probe file, and write one back?"""
    host = socket.gethostname()
    probe = Path(path)
    try:
        if probe.read_text() != token:
            return host, False, f"{probe} holds another build's probe"
        probe.with_name(probe.name + f".{host}.{os.getpid()}").write_text(token)
    except OSError as exc:
        return host, False, f"{type(exc).__name__}: {exc.strerror or exc}"
    return host, True, ""


class RayExecutor:
    """Stage work as Ray tasks and actor pools (see the module's docstring)."""

    name = "ray"

    def __init__(self, recipe: Recipe, rerun: str, address: str | None = None, num_cpus: int | None = None):
        import sys

        self.started = "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
        self.ray = connect(address, num_cpus)
        self.recipe, self.rerun = recipe, rerun
        self.runner = recipe.runner
        self._call = self.ray.remote(_call)
        self._actor = self.ray.remote(_StageWorker)
        self._probe = self.ray.remote(_probe)
        self.actors: dict[str, list] = {}  # the live actors of the stage running now, by stage name
        self.actors_started: dict[str, int] = {}  # actors started per stage, replacements included
        self.pool_sizes: dict[str, int] = {}
        self.sessions_closed: dict[str, int] = {}  # actors that left their session when their stage ended

    # -- checks made before anything runs ---------------------------------------------------------------
    def check_resources(self, stages: list[str]) -> None:
        """Every stage's workers must fit on the cluster as it is."""
        total = self.ray.cluster_resources()
        for name in stages:
            workers: Workers = getattr(self.runner, name)
            if workers.gpus > total.get("GPU", 0):
                have = int(total.get("GPU", 0))
                raise UserError(f"{self.recipe.path}: runner.{name}.gpus is {workers.gpus:g} but the Ray cluster has "
                                f"{'no GPUs' if not have else f'{have} GPUs'}. Add GPU nodes, or set "
                                f"runner.{name}.gpus to 0 (and the stage's device to cpu).")
            if workers.cpus > total.get("CPU", 0):
                raise UserError(f"{self.recipe.path}: runner.{name}.cpus is {workers.cpus:g} but the Ray cluster has "
                                f"{total.get('CPU', 0):g} CPUs. Lower runner.{name}.cpus.")

    def check_workdir(self, workdir: Path) -> None:
        """Each node writes a probe file next to the driver's and the driver reads it back."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        folder = Path(workdir) / ".probe"
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink(missing_ok=True)
        token = secrets.token_hex(8)
        probe = folder / "driver"
        probe.write_text(token)
        nodes = [n for n in self.ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
        calls = [self._probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(probe), token) for n in nodes]
        for node, (host, ok, detail) in zip(nodes, self.ray.get(calls)):
            written = set(p.name for p in folder.iterdir())
            if not ok or not any(name.startswith(f"driver.{host}.") for name in written):
                raise UserError(
                    f"The work directory {workdir} is not shared with Ray node {node.get('NodeManagerAddress')} "
                    f"({host}): {detail or 'the probe it wrote is not visible here'}. Every node must mount the "
                    f"work directory at the same path (NFS, Lustre, EFS, a mounted bucket): pass a --workdir on "
                    f"such a filesystem.")
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        folder.rmdir()

    # -- running work -----------------------------------------------------------------------------------
    def map(self, ctx, stage, method: str, items, args: tuple = (), *, session: bool = False, heavy: bool = True):
        items = list(items)
        if not items:
            return
        workers: Workers = getattr(self.runner, stage.name) if heavy else Workers()
        wctx = _stage_ctx(ctx, stage.name, workers)
        if session and stage.session_per_worker and heavy:
            yield from self._map_actors(wctx, stage, method, items, args, workers)
        else:
            yield from self._map_tasks(wctx, stage, method, items, args, workers, session)

    def _failed(self, stage, item, exc) -> Exception:
        """What the driver raises when an item cannot be done: the worker's own error where it has one."""
        from ray.exceptions import RayTaskError

        if getattr(exc, "actor_init_failed", False):  # the session could not start: retrying will not help
            lines = [line for line in str(exc).splitlines() if line.strip()]
            return RuntimeError(f"stage {stage.name}: a Ray worker could not start the stage's session "
                                f"({lines[-1].strip() if lines else type(exc).__name__}). Fix the cause and run "
                                f"`{self.rerun}` to resume.")
        if isinstance(exc, RayTaskError):
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (UserError, KeyboardInterrupt, OSError)):  # a full disk is explained by the runner
                return cause
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc).splitlines()[0]
            return RuntimeError(f"stage {stage.name}, {item!r} failed on a Ray worker: {detail}")
        return UserError(f"stage {stage.name}: {item!r} was lost {self.runner.max_retries + 1} times with its "
                         f"worker ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Finished "
                         f"shards are kept: fix the cause (memory: lower runner.{stage.name}.workers or raise "
                         f"its cpus) and run `{self.rerun}` to resume.")

    def _map_tasks(self, ctx, stage, method, items, args, workers: Workers, session: bool):
        ray = self.ray
        remote = self._call.options(num_cpus=workers.cpus, num_gpus=workers.gpus or None,
                                    max_retries=self.runner.max_retries, retry_exceptions=False)
        ctx_ref, stage_ref = ray.put(ctx), ray.put(stage)
        limit = workers.workers or len(items)
        pending, queue = {}, list(items)
        while queue or pending:
            while queue and len(pending) < limit:
                item = queue.pop(0)
                pending[remote.remote(ctx_ref, stage_ref, method, item, args, session)] = item
            done, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - reported with the shard
                for ref in pending:
                    ray.cancel(ref)
                raise self._failed(stage, item, exc) from None
            yield item, result

    def _pool_size(self, workers: Workers, n_items: int) -> int:
        if workers.workers:
            return min(workers.workers, n_items)
        total = self.ray.cluster_resources()
        fit = int(total.get("CPU", 1) // workers.cpus)
        if workers.gpus:
            fit = min(fit, int(total.get("GPU", 0) // workers.gpus))
        return max(1, min(fit, n_items))

    def _new_actor(self, ctx_ref, stage, workers: Workers):
        actor = self._actor.options(num_cpus=workers.cpus, num_gpus=workers.gpus or None,
                                    name=f"df-hf-{stage.name}-{secrets.token_hex(4)}").remote(ctx_ref, stage)
        self.actors.setdefault(stage.name, []).append(actor)
        self.actors_started[stage.name] = self.actors_started.get(stage.name, 0) + 1
        return actor

    def _room_for(self, workers: Workers) -> bool:
        free = self.ray.available_resources()
        return free.get("CPU", 0) >= workers.cpus and free.get("GPU", 0) >= workers.gpus

    def _map_actors(self, ctx, stage, method, items, args, workers: Workers):
        from ray.exceptions import RayActorError

        ray = self.ray
        ctx_ref = ray.put(ctx)
        self.pool_sizes[stage.name] = self._pool_size(workers, len(items))
        idle = [self._new_actor(ctx_ref, stage, workers) for _ in range(self.pool_sizes[stage.name])]
        queue, pending, attempts = list(items), {}, {}
        finished = False
        try:
            while queue or pending:
                while queue and idle:
                    actor, item = idle.pop(), queue.pop(0)
                    pending[actor.call.remote(method, item, args)] = (actor, item)
                if workers.max_workers and queue and len(self.actors[stage.name]) < workers.max_workers \
                        and self._room_for(workers):
                    idle.append(self._new_actor(ctx_ref, stage, workers))  # grow while shards wait
                    continue
                done, _ = ray.wait(list(pending), num_returns=1)
                actor, item = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except RayActorError as exc:
                    # The actor died (killed, out of memory, node lost): its shard goes to a new one.
                    attempts[item] = attempts.get(item, 0) + 1
                    self.actors[stage.name].remove(actor)
                    ray.kill(actor)  # "unavailable" may still be alive; killing a dead actor does nothing
                    if attempts[item] > self.runner.max_retries or getattr(exc, "actor_init_failed", False):
                        raise self._failed(stage, item, exc) from None
                    queue.insert(0, item)
                    idle.append(self._new_actor(ctx_ref, stage, workers))
                    continue
                except Exception as exc:  # noqa: BLE001 - reported with the shard
                    raise self._failed(stage, item, exc) from None
                idle.append(actor)
                yield item, result
            finished = True
        finally:
            # After a failure the busy actors are not waited for: killing them stops their workers too.
            self.sessions_closed[stage.name] = self._stop_actors(self.actors.get(stage.name, []),
                                                                 grace_s=30 if finished else 0)
            self.actors.pop(stage.name, None)

    def _stop_actors(self, actors: list, grace_s: float = 30) -> int:
        """Each actor leaves its session, waited for at most ``grace_s``, then is killed (all of them, whatever
        happens while waiting); returns how many left their session in time."""
        closed = 0
        try:
            closing = [actor.close.remote() for actor in actors] if grace_s else []
            if closing:
                closed = len(self.ray.wait(closing, num_returns=len(closing), timeout=grace_s)[0])
        finally:
            for actor in actors:
                with contextlib.suppress(Exception):
                    self.ray.kill(actor)
        return closed

    def close(self) -> None:
        for actors in self.actors.values():
            self._stop_actors(actors, grace_s=0)  # only a stage stopped midway leaves actors here
        self.actors.clear()
        if self.started:  # a Ray this build started (or joined) ends with it
            self.ray.shutdown()


def rerun_command(recipe: Recipe, workdir: Path, address: str | None) -> str:
    command = f"df-hf build {recipe.path} --workdir {workdir} --runner ray"
    return command + (f" --ray-address {address}" if address else "")


def build(recipe: Recipe, workdir: Path, only: str | None = None, fresh: bool = False, show_progress: bool = True,
          address: str | None = None, num_cpus: int | None = None) -> dict:
    """``runners.local.build`` with the stages' work on Ray; the same outputs, byte for byte."""
    from densefusion_hf.runners.local import build as local_build, parse_only

    workdir = Path(workdir).resolve()  # workers have other working directories
    executor = RayExecutor(recipe, rerun_command(recipe, workdir, address), address, num_cpus)
    try:
        executor.check_resources(parse_only(only, recipe))
        return local_build(recipe, workdir, only=only, fresh=fresh, show_progress=show_progress, executor=executor)
    finally:
        executor.close()
