"""The Ray runner on a real local Ray (2 CPUs): the same published bytes as the local runner, workers and the
driver killed mid-build, a work directory a node cannot see, and settings the cluster cannot meet."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from densefusion_hf.errors import RecipeError, UserError
from densefusion_hf.recipe import load_recipe
from densefusion_hf.stages.shards import StageDir
from tests.conftest import DEMO_RECIPE, REPO, run_cli, write_recipe

ray = pytest.importorskip("ray")


def _dataset_rows(workdir: Path) -> list[dict]:
    files = sorted((workdir / "dataset" / "densefusion-demo").glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def _published(workdir: Path) -> dict[str, bytes]:
    folder = workdir / "dataset"
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_on_ray_publishes_the_local_runners_bytes(demo_build, tmp_path):
    workdir = tmp_path / "work"
    result = run_cli("build", str(DEMO_RECIPE), "--workdir", str(workdir), "--runner", "ray", "--no-progress")
    assert result.returncode == 0, result.stderr + result.stdout
    ours, theirs = _published(workdir), _published(demo_build)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        if name == "README.md":  # the card's loading code names the folder it was built in
            assert ours[name].replace(str(workdir).encode(), b"W") == theirs[name].replace(str(demo_build).encode(),
                                                                                            b"W")
        else:
            assert ours[name] == theirs[name], name
    status = run_cli("status", str(workdir), "--json")
    assert status.returncode == 0 and '"ingest"' in status.stdout


def test_a_caption_actor_killed_mid_shard_is_replaced_and_the_rows_are_identical(demo_build, tmp_path, local_ray):
    from densefusion_hf.runners.local import build
    from densefusion_hf.runners.ray import RayExecutor

    recipe, workdir = load_recipe(DEMO_RECIPE), tmp_path / "work"
    executor = RayExecutor(recipe, "rerun")
    failure = []

    def run():
        try:
            build(recipe, workdir, show_progress=False, executor=executor)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.monotonic() + 600
    while thread.is_alive() and time.monotonic() < deadline:
        actors = executor.actors.get("caption") or []
        saved = list((workdir / "caption" / "chunks").glob("*/shard-*.done"))
        if actors and saved and killed is None:
            # Mid-shard: a shard has saved chunks but is not done. Every actor, so that the one holding it
            # dies whichever it is (another may be idle, its shards done).
            killed = list(actors)
            for actor in killed:
                ray.kill(actor)
            break
        time.sleep(0.05)
    thread.join(timeout=900)
    assert not thread.is_alive() and not failure, failure
    assert killed is not None, "the caption stage finished before an actor could be killed"
    assert executor.actors_started["caption"] > executor.pool_sizes["caption"]  # a replacement was started
    assert _dataset_rows(workdir) == _dataset_rows(demo_build)


def test_a_shard_lost_more_often_than_max_retries_stops_the_build_with_the_rerun_command(tmp_path, local_ray):
    from densefusion_hf.runners.local import build
    from densefusion_hf.runners.ray import RayExecutor

    recipe, workdir = load_recipe(DEMO_RECIPE), tmp_path / "work"
    build(recipe, workdir, only="ingest,fetch,dedup", show_progress=False)
    recipe.runner.max_retries, recipe.runner.embed.workers = 0, 1  # one actor, and no second try
    executor = RayExecutor(recipe, "df-hf build RERUN")
    failure = []

    def run():
        try:
            build(recipe, workdir, only="embed", show_progress=False, executor=executor)
        except BaseException as exc:  # noqa: BLE001 - looked at by the test
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    while not executor.actors.get("embed") and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    actor = executor.actors["embed"][0]
    ray.get(actor.pid.remote())  # answered after the shard in hand: the actor is taking its next one
    ray.kill(actor)
    thread.join(timeout=300)
    assert not thread.is_alive() and len(failure) == 1
    message = str(failure[0])
    assert isinstance(failure[0], UserError) and "stage embed" in message and "was lost 1 times" in message
    assert "`df-hf build RERUN`" in message and "runner.embed" in message
    done = StageDir(workdir, "embed").done_shards()
    assert 1 <= len(done) < len(StageDir(workdir, "dedup").done_shards())  # the finished shard is kept
    # The same build, resumed: the rest of the shards, none done twice.
    before = {s: (workdir / "embed" / f"shard-{s}.done").stat().st_mtime_ns for s in done}
    recipe.runner.max_retries = 3
    build(recipe, workdir, only="embed", show_progress=False, executor=RayExecutor(recipe, "rerun"))
    assert StageDir(workdir, "embed").done_shards() == StageDir(workdir, "dedup").done_shards()
    assert all((workdir / "embed" / f"shard-{s}.done").stat().st_mtime_ns == t for s, t in before.items())


def _img2dataset_workers_of_actors() -> dict[int, int]:
    """img2dataset's spawned workers whose parent is a Ray actor of the runner: {worker pid: actor pid}. Only
    this process's descendants (its local Ray's): another build on the machine has actors too."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(proc.cmdline()) and "_StageWorker" in " ".join(proc.parent().cmdline()):
                found[proc.pid] = proc.ppid()
    return found


def test_fetch_actors_keep_img2dataset_workers_from_shard_to_shard_then_stop_them(tmp_path, local_ray):
    from densefusion_hf.runners.local import build
    from densefusion_hf.runners.ray import RayExecutor

    recipe, workdir = load_recipe(DEMO_RECIPE), tmp_path / "work"
    recipe.fetch.processes = 2  # with one, an actor downloads in its own process and starts no worker
    executor = RayExecutor(recipe, "rerun")
    build(recipe, workdir, only="ingest", show_progress=False, executor=executor)
    shards = len(StageDir(workdir, "ingest").done_shards())
    seen: dict[int, int] = {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.update(_img2dataset_workers_of_actors())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        build(recipe, workdir, only="fetch", show_progress=False, executor=executor)
    finally:
        stop.set()
        watcher.join()
    assert len(StageDir(workdir, "fetch").done_shards()) == shards
    # Fewer actors than shards, and each actor's two img2dataset workers (fetch.processes: 2) served all its
    # shards: no worker was started per shard.
    assert executor.actors_started["fetch"] == executor.pool_sizes["fetch"] < shards
    # (fewer parts per worker than img2dataset_workers.MAX_TASKS, after which a worker is replaced)
    assert seen and len(seen) <= 2 * executor.pool_sizes["fetch"], seen
    # Every actor left its session before it was killed, and that stopped the workers.
    assert executor.sessions_closed["fetch"] == executor.pool_sizes["fetch"]
    workers = []
    for pid in seen:
        with contextlib.suppress(psutil.NoSuchProcess):
            workers.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive


def test_a_session_that_cannot_start_on_a_worker_stops_the_stage_with_its_error(tmp_path, local_ray):
    from densefusion_hf.runners.ray import RayExecutor
    from densefusion_hf.stages.base import BuildContext, ShardStage

    class NoModel(ShardStage):  # defined here, so Ray sends it by value
        name = "embed"
        session_per_worker = True

        def session(self, ctx):
            raise UserError("the model folder /nowhere does not exist")

    recipe = load_recipe(DEMO_RECIPE)
    executor = RayExecutor(recipe, "df-hf build again")
    started = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        list(executor.map(BuildContext(recipe, tmp_path, show_progress=False), NoModel(), "run_shard",
                          ["00000", "00001"], session=True))
    message = str(info.value)
    assert "/nowhere does not exist" in message and "df-hf build again" in message, message
    assert executor.actors_started["embed"] == executor.pool_sizes["embed"]  # not retried max_retries times
    assert time.monotonic() - started < 120


def test_a_killed_driver_is_resumed_by_the_same_command(demo_build, tmp_path):
    workdir = tmp_path / "work"
    command = [sys.executable, "-m", "densefusion_hf", "build", str(DEMO_RECIPE), "--workdir", str(workdir),
               "--runner", "ray", "--no-progress"]
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    marker = workdir / "embed" / "shard-00000.done"  # after fetch, dedup's decision and its first shards
    deadline = time.monotonic() + 600
    while not marker.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    # From another terminal, during the Ray build: what is done so far.
    status = run_cli("status", str(workdir))
    os.killpg(child.pid, signal.SIGKILL)  # the driver and the local Ray it started
    child.wait()
    assert marker.exists() and not (workdir / "dataset").exists()
    assert status.returncode == 0, status.stderr
    table = status.stdout.split("dropped rows by reason")[0]
    lines = {line.split()[0]: line for line in table.splitlines() if line.split()}
    assert "done" in lines["fetch"] and "done" in lines["dedup"] and "embed" in lines, status.stdout
    result = run_cli("build", str(DEMO_RECIPE), "--workdir", str(workdir), "--runner", "ray", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert _dataset_rows(workdir) == _dataset_rows(demo_build)


def _can_unshare() -> bool:
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs mount namespaces (root) to give a Ray node its own /tmp view")
def test_a_work_directory_a_node_cannot_see_is_refused(tmp_path):
    """The Ray node runs in its own mount namespace with an empty tmpfs over the work directory's parent: the
    driver sees one folder there, the node another, as with a node-local path on a real cluster."""
    shared = tmp_path / "nfs"
    shared.mkdir()
    port = _free_port()
    script = (f"mount -t tmpfs none {shared} && exec {Path(sys.executable).parent / 'ray'} start --head "
              f"--port={port} --num-cpus=1 --include-dashboard=false --disable-usage-stats --block")
    node = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert node.poll() is None, "ray start failed"
                time.sleep(0.5)
        recipe = write_recipe(tmp_path / "r.yaml", {"extends": str(DEMO_RECIPE)})
        result = run_cli("build", str(recipe), "--workdir", str(shared / "work"), "--runner", "ray",
                         "--ray-address", f"127.0.0.1:{port}", "--no-progress", timeout=300)
        assert result.returncode != 0
        assert "is not shared with Ray node" in result.stderr and "same path" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not (shared / "work" / "fetch").exists()  # refused before any stage ran
    finally:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()


def test_unknown_runner_settings_name_the_field(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"extends": str(DEMO_RECIPE), "runner": {"embed": {"gpu": 1}}})
    with pytest.raises(RecipeError, match=r"runner\.embed.*gpu"):
        load_recipe(recipe)
    recipe = write_recipe(tmp_path / "r.yaml", {"extends": str(DEMO_RECIPE),
                                                "runner": {"caption": {"workers": 4, "max_workers": 2}}})
    with pytest.raises(RecipeError, match=r"runner\.caption.*max_workers"):
        load_recipe(recipe)


def test_runner_settings_change_no_fingerprint_and_are_listed_with_the_recipe_fields(tmp_path):
    # Speed only: a build resumed with other workers, batch sizes or retries must not be refused as changed.
    from densefusion_hf.runners.manifest import fingerprint
    from densefusion_hf.stages import STAGES

    base = load_recipe(DEMO_RECIPE)
    changed = load_recipe(write_recipe(tmp_path / "r.yaml", {"extends": str(DEMO_RECIPE), "runner": {
        "max_retries": 1, "fetch": {"cpus": 2, "workers": 3}, "embed": {"cpus": 0.5, "batch_size": 7},
        "caption": {"workers": 1, "max_workers": 4, "batch_size": 3}}}))
    assert changed.runner != base.runner
    upstream = {"base": None, "changed": None}
    for name in base.stages:
        for label, recipe in (("base", base), ("changed", changed)):
            upstream[label] = fingerprint(STAGES[name].params(recipe), upstream[label])
        assert upstream["changed"] == upstream["base"], name
    listed = run_cli("recipe", "fields").stdout
    for field in ("runner.max_retries", "runner.caption.max_workers", "runner.embed.gpus", "runner.fetch.batch_size"):
        assert field in listed, field


def test_gpus_asked_of_a_cluster_without_them_are_refused_before_anything_runs(tmp_path, local_ray):
    from densefusion_hf.runners.ray import build

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", {"extends": str(DEMO_RECIPE),
                                                            "runner": {"embed": {"gpus": 1}}}))
    with pytest.raises(UserError, match=r"runner\.embed\.gpus is 1 but the Ray cluster has no GPUs"):
        build(recipe, tmp_path / "work", show_progress=False)
    assert not (tmp_path / "work" / "ingest").exists()


def test_an_unreachable_address_is_a_clear_error(tmp_path):
    started = time.monotonic()
    result = run_cli("build", str(DEMO_RECIPE), "--workdir", str(tmp_path / "work"), "--runner", "ray",
                     "--ray-address", f"127.0.0.1:{_free_port()}", "--no-progress", timeout=120)
    assert result.returncode != 0
    assert "no Ray cluster answers there" in result.stderr and "ray start --head" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def test_a_caption_server_per_node_is_named_by_the_workers_node_address(local_ray):
    from densefusion_hf.fusion.openai_engine import server_url

    on_worker = ray.get(ray.remote(server_url).remote("http://{node_ip}:8000/v1"))
    assert on_worker == f"http://{ray.util.get_node_ip_address()}:8000/v1"
    assert server_url("http://10.0.0.5:8000/v1") == "http://10.0.0.5:8000/v1"  # a fixed address stays
