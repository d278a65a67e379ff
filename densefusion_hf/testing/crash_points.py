"""Crash points: kill a real build with SIGKILL at seeded instants spread over every stage, rerun each killed
build to completion, and check that it publishes exactly the rows of an uninterrupted build.

    python -m densefusion_hf.testing.crash_points RECIPE --kills 20 --seed 0 [--runner ray] [--worker-kills 2]

How the instants are chosen, and why the cost stays bounded:

1. The reference: the recipe built once, uninterrupted, in ``ROOT/reference``.
2. The stage starts: the recipe built again one stage at a time (``--only ingest``, then ``--only
   ingest,fetch``, ...). Before each stage runs, the work directory is copied to ``ROOT/prefix/STAGE``: a
   state in which every earlier stage is complete and STAGE has not started. Each stage's duration is
   measured on the way (from its manifest entry appearing to its entry saying complete).
3. Each kill targets a stage (every stage gets one, the rest are dealt round-robin) and a seeded fraction of
   that stage's duration. It copies the stage's prefix state, starts a full ``df-hf build`` there, waits for
   the build to record the stage in the manifest (the stage has started in this process), sleeps the
   fraction, and sends SIGKILL to the build's whole process group (its download and worker processes too).
   Where the kill landed is read back from the manifest; a kill that came after its stage had finished is
   tried again earlier, so that every stage is really hit.
4. The killed work directory is built again, to completion, with the same command, and its published files
   are compared with the reference's: the same keys, the same row bytes, nothing lost or duplicated, and
   every published file byte for byte (the card only after replacing the folder it names).

A kill thus costs its stage's remainder and the stages after it, never the stages before it, and local
builds are forked from a process that has already imported torch, datasets and the stages (``ForkServer``),
so that no kill or rerun pays the imports again. With the Ray
runner (``--runner ray``) the same kills stop the driver (and the local Ray it started), and
``--worker-kills`` kills one busy Ray worker process during a stage of a build that then has to finish by
itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

POLL = 0.002  # seconds between looks at the manifest: the shortest demo stages last tens of milliseconds
MANIFEST = "manifest.json"


@dataclass
class Comparison:
    """How a build's published files differ from the reference's; empty lists mean identical."""

    rows: int = 0
    lost: list = field(default_factory=list)
    duplicated: list = field(default_factory=list)
    extra: list = field(default_factory=list)
    changed: list = field(default_factory=list)
    files: list = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not (self.lost or self.duplicated or self.extra or self.changed or self.files)


@dataclass
class Kill:
    """One SIGKILL and the rerun after it."""

    target: str                 # the stage it was aimed at
    fraction: float             # of the stage's measured duration
    kind: str = "build"         # build: the whole build's process group; worker: one Ray worker process
    landed: str = ""            # the stage running when it came ("" if the build had finished first)
    seconds_in: float = 0.0     # after the stage started
    killed: str = ""            # worker kills: the process killed ("" if none was busy before the stage ended)
    rerun_returncode: int | None = None
    rerun_seconds: float = 0.0
    comparison: Comparison | None = None
    workdir: str = ""
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.rerun_returncode == 0 and self.comparison is not None and self.comparison.identical


def build_args(recipe: Path, workdir: Path, runner: str = "local", only: list[str] | None = None) -> list[str]:
    """``df-hf`` arguments of the build."""
    args = ["build", str(recipe), "--workdir", str(workdir), "--no-progress"]
    if only:
        args += ["--only", ",".join(only)]
    if runner != "local":
        args += ["--runner", runner]
    return args


class Launcher:
    """Starts ``df-hf`` commands as ``python -m densefusion_hf`` processes, each in its own process group (so
    one signal reaches its download and worker processes), output appended to a log."""

    def start(self, args: list[str], log: Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "densefusion_hf", *args], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def close(self) -> None:
        pass


# The fork server: imports what every build imports (torch, datasets, the stages: 5-25 s a process on two
# busy cores), then forks one build per request. The child is a new session running the CLI's ``main``, as
# ``python -m densefusion_hf`` does; nothing has run in the parent but imports, so no thread or model is
# inherited. It answers {"pid"} when a build starts and {"exit"} when it ends.
_FORK_SERVER = r"""
import importlib, json, os, sys, traceback
for name in ("torch", "datasets", "transformers", "densefusion_hf.cli", "densefusion_hf.runners.local",
             "densefusion_hf.stages.publish", "densefusion_hf.stages.caption", "densefusion_hf.stages.fetch"):
    importlib.import_module(name)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdin = open(os.devnull)
        code = 0
        try:
            from densefusion_hf.cli import main
            main(request["args"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkedBuild:
    """A build forked by the fork server, with the parts of ``Popen`` the harness uses."""

    def __init__(self, server: subprocess.Popen, pid: int):
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.server.stdout], [], [], 0)[0]:
            self._read()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self.server.stdout], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired("df-hf build", timeout)
            self._read()
        return self.returncode

    def _read(self) -> None:
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError("the fork server stopped")
        self.returncode = json.loads(line)["exit"]


class ForkServer(Launcher):
    """Builds forked from one process that has done the imports: the same CLI, without their cost."""

    def __init__(self):
        self.server = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, bufsize=1,
                                       env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def start(self, args: list[str], log: Path) -> ForkedBuild:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.server.stdin.write(json.dumps({"args": args, "log": str(log)}) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server stopped (exit status {self.server.wait()})")
        return ForkedBuild(self.server, json.loads(line)["pid"])

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait()


def run_to_completion(launcher: Launcher, args: list[str], log: Path, timeout: float) -> int:
    child = launcher.start(args, log)
    try:
        return child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(child)
        return -signal.SIGKILL


def kill_group(child) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def manifest_stages(workdir: Path) -> dict[str, bool] | None:
    """{stage: complete} as the manifest says now; None before the build has written one."""
    try:
        data = json.loads((workdir / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):  # written by os.replace, so a read sees a whole file or none
        return None
    return {name: bool(entry.get("complete")) for name, entry in data.get("stages", {}).items()}


def running_stage(workdir: Path, stages: list[str]) -> str:
    """The first stage the manifest does not record as complete; "" when all are."""
    recorded = manifest_stages(workdir) or {}
    return next((name for name in stages if not recorded.get(name)), "")


def wait_until(condition, child: subprocess.Popen, timeout: float, poll: float = POLL) -> bool:
    """Poll ``condition`` until it holds; False if the child exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if child.poll() is not None:
            return condition()
        time.sleep(poll)
    return False


def stage_started(workdir: Path, stage: str):
    """True once this build has recorded ``stage`` in the manifest (a prefix state has no entry for it)."""
    return lambda: stage in (manifest_stages(workdir) or {})


def stage_finished(workdir: Path, stage: str):
    return lambda: (manifest_stages(workdir) or {}).get(stage, False)


# -- the published files ---------------------------------------------------------------------------------------

def published_files(workdir: Path) -> dict[str, bytes]:
    """Every file under WORKDIR/dataset; the card names the folder it was built in, replaced by a mark."""
    folder = workdir / "dataset"
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            name = path.relative_to(folder).as_posix()
            data = path.read_bytes()
            files[name] = data.replace(str(workdir).encode(), b"WORKDIR") if name == "README.md" else data
    return files


def published_rows(workdir: Path) -> list[dict]:
    return [row for path in sorted((workdir / "dataset").glob("*/*.parquet"))
            for row in pq.read_table(path).to_pylist()]


def compare(reference: Path, workdir: Path) -> Comparison:
    expected = {row["key"]: row for row in published_rows(reference)}
    rows = published_rows(workdir) if (workdir / "dataset").is_dir() else []
    seen: dict[str, int] = {}
    for row in rows:
        seen[row["key"]] = seen.get(row["key"], 0) + 1
    result = Comparison(rows=len(rows))
    result.lost = sorted(set(expected) - set(seen))
    result.extra = sorted(set(seen) - set(expected))
    result.duplicated = sorted(k for k, n in seen.items() if n > 1)
    result.changed = sorted({row["key"] for row in rows if row["key"] in expected and row != expected[row["key"]]})
    ours, theirs = published_files(workdir), published_files(reference)
    result.files = sorted(name for name in set(ours) | set(theirs) if ours.get(name) != theirs.get(name))
    return result


# -- the plan --------------------------------------------------------------------------------------------------

def measure_stages(launcher: Launcher, recipe: Path, root: Path, stages: list[str],
                   timeout: float) -> dict[str, float]:
    """Build the recipe a stage at a time in ROOT/staged, saving ROOT/prefix/STAGE (the work directory just
    before STAGE) and returning each stage's duration in seconds."""
    workdir, durations = root / "staged", {}
    workdir.mkdir(parents=True, exist_ok=True)
    for i, stage in enumerate(stages):
        shutil.copytree(workdir, root / "prefix" / stage, symlinks=True)
        child = launcher.start(build_args(recipe, workdir, only=stages[: i + 1]), root / "logs" / "staged.log")
        if not wait_until(stage_started(workdir, stage), child, timeout):
            kill_group(child)
            raise RuntimeError(f"stage {stage} never started; see {root / 'logs' / 'staged.log'}")
        began = time.monotonic()
        wait_until(stage_finished(workdir, stage), child, timeout)
        durations[stage] = time.monotonic() - began
        if child.wait(timeout=timeout) != 0:
            raise RuntimeError(f"--only {','.join(stages[: i + 1])} failed; see {root / 'logs' / 'staged.log'}")
    return durations


def plan_kills(stages: list[str], kills: int, seed: int, durations: dict[str, float] | None = None) -> list[Kill]:
    """Every stage once (a seeded choice of stages when there are fewer kills); the rest dealt round-robin
    to the stages whose rerun (the stage and those after it) takes at most a quarter of the build, so that
    most reruns are short; each kill at a seeded fraction of its stage."""
    rng = random.Random(seed)
    order = rng.sample(stages, len(stages))
    cheap = stages
    if durations:
        total = sum(durations.values())
        cheap = [s for i, s in enumerate(stages) if sum(durations[t] for t in stages[i:]) <= total / 4] or stages
    extra = [cheap[i % len(cheap)] for i in range(max(0, kills - len(stages)))]
    targets = sorted(order[:kills] + extra, key=stages.index)
    return [Kill(target=t, fraction=round(rng.random(), 4)) for t in targets]


# -- the kills -------------------------------------------------------------------------------------------------

# Process titles of Ray workers busy with the build's work: a task of ``runners.ray._call`` or an actor of
# ``runners.ray._StageWorker``. Ray's own processes (``ray::DashboardAgent`` and the like) are left alone:
# killing them takes the node down, which is the driver's crash, not a worker's.
WORKER_TITLES = ("ray::_call", "ray::_StageWorker")


def _workers(child) -> list:
    """Ray worker processes under the build that hold a task or an actor of the build (not idle ones)."""
    import psutil

    try:
        descendants = psutil.Process(child.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    busy = []
    for proc in descendants:
        try:
            title = " ".join(proc.cmdline()).strip()
        except psutil.Error:
            continue
        if title.startswith(WORKER_TITLES):
            busy.append(proc)
    return busy


def crash(launcher: Launcher, kill: Kill, recipe: Path, root: Path, number: int, durations: dict[str, float],
          stages: list[str], runner: str, timeout: float) -> None:
    """Run one kill from its stage's prefix state, then the rerun to completion; fills in ``kill``."""
    workdir = root / "kills" / f"{runner}-{number:03d}-{kill.target}-{kill.kind}"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(root / "prefix" / kill.target, workdir, symlinks=True)
    log = root / "logs" / f"{workdir.name}.log"
    kill.workdir, kill.log = str(workdir), str(log)
    args = build_args(recipe, workdir, runner)
    child = launcher.start(args, log)
    if not wait_until(stage_started(workdir, kill.target), child, timeout):
        kill_group(child)
        raise RuntimeError(f"stage {kill.target} never started in {workdir}; see {log}")
    began = time.monotonic()
    if kill.kind == "worker":
        # A worker busy with this stage's work (a task or an actor's call), killed alone: the build goes on.
        wait_until(lambda: bool(_workers(child)) or stage_finished(workdir, kill.target)(), child, timeout,
                   poll=0.05)  # listing processes costs more than reading the manifest
        time.sleep(kill.fraction * durations[kill.target] / 2)
        kill.landed = running_stage(workdir, stages) if child.poll() is None else ""
        for proc in _workers(child)[:1]:
            kill.killed = f"{proc.pid} {' '.join(proc.cmdline()).strip()}"
            proc.kill()
        kill.seconds_in = time.monotonic() - began
        started = time.monotonic()
        try:
            kill.rerun_returncode = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(child)
            kill.rerun_returncode = -signal.SIGKILL
        kill.rerun_seconds = time.monotonic() - started
    else:
        wait_until(lambda: time.monotonic() - began >= kill.fraction * durations[kill.target], child, timeout)
        kill.seconds_in = time.monotonic() - began
        kill_group(child)
        kill.landed = running_stage(workdir, stages)
        started = time.monotonic()
        kill.rerun_returncode = run_to_completion(launcher, args, log, timeout)
        kill.rerun_seconds = time.monotonic() - started
    kill.comparison = compare(root / "reference", workdir) if kill.rerun_returncode == 0 else None


def run_crash_points(recipe: Path, root: Path, kills: int = 20, seed: int = 0, runner: str = "local",
                     worker_kills: int = 0, timeout: float = 900, retries: int = 3, fork_server: bool = True,
                     report=None) -> list[Kill]:
    """The whole harness (see the module's text); returns every kill made, retries included.

    ``fork_server`` forks the local runner's builds from one process that has done the imports (see
    ``ForkServer``); the Ray runner's builds always start as processes of their own."""
    from densefusion_hf.recipe import load_recipe

    recipe, root = Path(recipe).resolve(), Path(root).resolve()
    stages = list(load_recipe(recipe).stages)
    report = report or (lambda line: None)
    launcher = ForkServer() if fork_server else Launcher()
    try:
        durations = _prepare(launcher, recipe, root, stages, timeout, report)
        plan = plan_kills(stages, kills, seed, durations)
        rng = random.Random(seed + 1)
        plan += [Kill(target=rng.choice([s for s in stages if s not in ("ingest", "publish")]),
                      fraction=round(rng.random(), 4), kind="worker") for _ in range(worker_kills)]
        builds = launcher if runner == "local" else Launcher()
        done: list[Kill] = []
        for kill in plan:
            for attempt in range(retries + 1):
                crash(builds, kill, recipe, root, len(done), durations, stages, runner, timeout)
                done.append(kill)
                report(describe(kill))
                if kill.kind == "worker" or kill.landed == kill.target or attempt == retries:
                    break
                # It came after its stage had finished (a busy machine runs slower than it measured): earlier.
                kill = Kill(target=kill.target, fraction=round(kill.fraction / 3, 4), kind=kill.kind)
        return done
    finally:
        launcher.close()


def _prepare(launcher: Launcher, recipe: Path, root: Path, stages: list[str], timeout: float, report) -> dict:
    """The reference build and the prefix states, made once per ROOT; returns the stage durations."""
    reference = root / "reference"
    if not (reference / "dataset").is_dir():
        shutil.rmtree(reference, ignore_errors=True)
        started = time.monotonic()
        log = root / "logs" / "reference.log"
        if run_to_completion(launcher, build_args(recipe, reference), log, timeout) != 0:
            raise RuntimeError(f"the uninterrupted build failed; see {log}")
        report(f"reference build: {time.monotonic() - started:.1f} s, {len(published_rows(reference))} rows")
    if not (root / "durations.json").is_file():
        shutil.rmtree(root / "prefix", ignore_errors=True)
        shutil.rmtree(root / "staged", ignore_errors=True)
        durations = measure_stages(launcher, recipe, root, stages, timeout)
        staged = compare(reference, root / "staged")
        if not staged.identical:
            raise RuntimeError(f"the build made a stage at a time differs from the uninterrupted one: {staged}")
        (root / "durations.json").write_text(json.dumps(durations, indent=1))
    durations = json.loads((root / "durations.json").read_text())
    report("stage durations: " + ", ".join(f"{s} {d:.2f} s" for s, d in durations.items()))
    return durations


def describe(kill: Kill) -> str:
    c = kill.comparison
    result = ("identical" if kill.ok else
              f"rerun exited {kill.rerun_returncode}" if c is None else
              f"{len(c.lost)} lost, {len(c.duplicated)} duplicated, {len(c.extra)} extra, {len(c.changed)} "
              f"changed rows, files differing: {', '.join(c.files) or 'none'}")
    what = f" ({kill.killed or 'no busy worker found'})" if kill.kind == "worker" else ""
    return (f"{kill.kind} kill{what} aimed at {kill.target} ({kill.fraction:.0%}) landed in {kill.landed or 'none'} "
            f"{kill.seconds_in:.2f} s in; rerun {kill.rerun_seconds:.1f} s: {result}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densefusion_hf.testing.crash_points",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of the whole build (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runner", choices=["local", "ray"], default="local")
    parser.add_argument("--worker-kills", type=int, default=0, help="with --runner ray: Ray workers killed")
    parser.add_argument("--root", type=Path, default=Path("crash-points"),
                        help="folder for the reference, the prefix states and every killed build (kept)")
    parser.add_argument("--json", type=Path, help="also write every kill's record here")
    parser.add_argument("--no-fork-server", dest="fork_server", action="store_false",
                        help="start every build as a new python process (slower: each one imports again)")
    args = parser.parse_args(argv)
    if args.worker_kills and args.runner != "ray":
        parser.error("--worker-kills needs --runner ray")
    kills = run_crash_points(args.recipe, args.root, args.kills, args.seed, args.runner, args.worker_kills,
                             fork_server=args.fork_server, report=lambda line: print(line, flush=True))
    failed = [k for k in kills if not k.ok]
    landed = sorted({k.landed for k in kills if k.landed})
    print(f"{len(kills)} kills, landed in: {', '.join(landed)}; {len(kills) - len(failed)} reruns identical to "
          f"the uninterrupted build, {len(failed)} not")
    if args.json:
        args.json.write_text(json.dumps([asdict(k) for k in kills], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
