"""The `recserve` command through typer's CliRunner: the offline stages in order, and clean one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recserve.cli import app
from recserve.evaluate import METRICS, MODELS

pytestmark = pytest.mark.unit

EPOCHS = ["--tower-epochs", "1", "--mf-epochs", "1", "--ranker-epochs", "1", "--budget-minutes", "0.05"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def _error_line(result) -> str:
    """The single line an expected failure prints; no traceback anywhere."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_synth_train_evaluate(runner: CliRunner, tmp_path: Path):
    data, artifacts = tmp_path / "data", tmp_path / "artifacts"
    result = runner.invoke(app, ["data", "synth", "--out", str(data), "--users", "120", "--items", "80",
                                 "--interactions", "2400", "--categories", "6", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "users" in result.output and str(data) in result.output
    assert {p.name for p in data.iterdir()} == {"ratings.dat", "movies.dat", "users.dat"}

    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(artifacts), *EPOCHS, "--quiet"])
    assert result.exit_code == 0, result.output
    for name in ("dataset.npz", "popularity.npz", "mf.pt", "two_tower.pt", "ranker.pt", "train.json"):
        assert (artifacts / name).is_file(), name

    for name in ("baselines.json", "ranker_gate.json", "sources.npz", "blend.json"):
        assert (artifacts / name).is_file(), name

    result = runner.invoke(app, ["evaluate", "--artifacts", str(artifacts)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == ["model"])
    assert lines[at].split()[:len(METRICS) + 1] == ["model", *METRICS] and "test-time data" in lines[at]
    rows = {line.split()[0]: line.split()[1:] for line in lines[at + 1:] if not line.startswith("*")}
    assert set(rows) == {*MODELS, "ease", "itemknn", "als"}
    for name, values in rows.items():
        figures = [v for v in values if v != "*"][:len(METRICS)]
        assert all(v == "n/a" or 0.0 <= float(v) <= 1.0 for v in figures), name
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert lines[-1] == "* served by `export repository`" and metrics["served"] in MODELS
    assert metrics["protocol"]["test_time_data"]["ease"] == "refit on train+valid"


def test_train_on_a_missing_directory_is_one_clean_line(runner: CliRunner, tmp_path: Path):
    missing = tmp_path / "nonexistent"
    result = runner.invoke(app, ["train", "--data", str(missing), "--out", str(tmp_path / "a"), *EPOCHS, "--quiet"])
    line = _error_line(result)
    assert str(missing) in line and "does not exist" in line
    assert not (tmp_path / "a").exists()


def test_evaluate_without_artifacts_is_one_clean_line(runner: CliRunner, tmp_path: Path):
    result = runner.invoke(app, ["evaluate", "--artifacts", str(tmp_path)])
    line = _error_line(result)
    assert str(tmp_path / "dataset.npz") in line and "missing" in line and "recserve train" in line


def test_items_add_on_a_bad_file_or_repository_is_one_clean_line(runner: CliRunner, tmp_path: Path, tiny_artifacts):
    from recserve.deploy import deploy
    from recserve.serving.repository import RepoOptions

    repository = tmp_path / "repo"
    deploy(tiny_artifacts, repository, RepoOptions(candidates=40))
    (tmp_path / "bad.csv").write_text("item_id,title,genres\n9000,New,Polka\n")
    result = runner.invoke(app, ["items", "add", "--repository", str(repository), "--items", str(tmp_path / "bad.csv")])
    line = _error_line(result)
    assert f"{tmp_path / 'bad.csv'}, line 2: genre 'Polka' is not one the models know; choose from cat00" in line
    assert not (tiny_artifacts.parent / f"{tiny_artifacts.name}-items-v2").exists(), "nothing written"
    missing = runner.invoke(app, ["items", "add", "--repository", str(tmp_path / "nowhere"), "--items",
                                  str(tmp_path / "bad.csv")])
    assert "manifest.json" in _error_line(missing)


def test_export_repository_says_when_the_ranker_step_keeps_the_retrieval_order(runner: CliRunner, tmp_path: Path,
                                                                               tiny_artifacts):
    import shutil

    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, artifacts)
    gate = json.loads((artifacts / "ranker_gate.json").read_text())
    (artifacts / "ranker_gate.json").write_text(json.dumps({**gate, "shipped": False}))
    result = runner.invoke(app, ["export", "repository", "--artifacts", str(artifacts),
                                 "--repository", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    assert "the ranker is not shipped" in result.output and "keeps the retrieval order" in result.output
    manifest = json.loads((tmp_path / "repo" / "manifest.json").read_text())
    assert manifest["ranker"]["shipped"] is False


def test_synth_with_drift_writes_data_and_a_bad_drift_is_one_clear_line(runner: CliRunner, tmp_path: Path):
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "d"), "--users", "120", "--items", "80",
                                 "--interactions", "2400", "--drift", "8"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "ratings.dat").stat().st_size > 0
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "e"), "--users", "120", "--items", "80",
                                 "--interactions", "2400", "--drift", "-1"])
    assert "drift must be a finite number >= 0, got -1.0" in _error_line(result)
    assert not (tmp_path / "e").exists()
