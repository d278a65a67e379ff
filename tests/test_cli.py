"""The command line: help texts, messages and exit codes."""

from click.testing import CliRunner

from densefusion_hf.cli import cli
from tests.conftest import run_cli, write_recipe


def test_every_command_explains_its_options():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0 and "build" in top.output and "status" in top.output
    build = runner.invoke(cli, ["build", "--help"]).output
    for option in ("--workdir", "--only", "--fresh", "--progress / --no-progress", "RECIPE"):
        assert option in build
    assert "resume" in build
    status = runner.invoke(cli, ["status", "--help"]).output
    assert "WORKDIR" in status and "--json" in status
    assert "fields" in runner.invoke(cli, ["recipe", "--help"]).output


def test_bad_recipe_is_one_paragraph_and_exit_1(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {"name": "x", "source": {"sample": True}, "fetch": {"threds": 2}})
    result = run_cli("build", str(path), "--workdir", str(tmp_path / "w"))
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr
    assert "fetch.threds: unknown field" in result.stderr and "Did you mean 'threads'" in result.stderr
    assert not (tmp_path / "w").exists()


def test_missing_recipe_and_unknown_stage(tmp_path):
    result = run_cli("build", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1 and "recipe file not found" in result.stderr
    path = write_recipe(tmp_path / "r.yaml", {"name": "x", "source": {"sample": True}})
    result = run_cli("build", str(path), "--only", "fecth", "--workdir", str(tmp_path / "w"))
    assert result.returncode == 1 and "unknown stage fecth" in result.stderr and "ingest, fetch, dedup, select, publish" in result.stderr


def test_status_of_a_folder_that_is_not_a_workdir(tmp_path):
    result = run_cli("status", str(tmp_path))
    assert result.returncode == 1 and "is not a work directory" in result.stderr


def test_usage_error_exits_2():
    result = run_cli("build")
    assert result.returncode == 2 and "Missing argument 'RECIPE'" in result.stderr


def test_recipe_check_and_fields(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {"name": "x", "source": {"sample": True}})
    result = run_cli("recipe", "check", str(path))
    assert result.returncode == 0 and "valid recipe 'x'" in result.stdout
    fields = run_cli("recipe", "fields").stdout
    assert "filters.min_short_side" in fields and "cap the longer side" in fields
