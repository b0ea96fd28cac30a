"""Classifier plugins: the user's own classifier, registered from their own module, searched, recorded on the
study and exported like a built-in one (examples/plugins/shrunken_centroid.py is the example)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from adsearch.cli import app
from adsearch.search.classifiers import REGISTRY

EXAMPLE = Path(__file__).parents[1] / "examples" / "plugins" / "shrunken_centroid.py"
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on sys.path and PYTHONPATH (worker processes too) holding a copy of the example plugin; the
    registry and sys.modules are left as they were."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    import adsearch.search.regressors  # noqa: F401  (registered now, so the snapshot below holds them)

    before = dict(REGISTRY)
    yield folder
    REGISTRY.clear()
    REGISTRY.update(before)
    for name in [m for m in sys.modules if m in ("shrunken_centroid", "broken_plugin", "takes_logreg",
                                                 "with_helper", "helper_scale")]:
        del sys.modules[name]


def _cache(tmp_path: Path) -> Path:
    from adsearch.embed.synthetic import write_synthetic_cache

    return write_synthetic_cache(tmp_path / "cache", n_train=40, n_test=12, n_layers=3, dim=8, signal_layer=1)


def _space(tmp_path: Path, classifiers=("shrunken_centroid", "logreg"), **extra) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"cv": {"folds": 3}, "screen": {"enabled": False},
                                    "space": {"classifiers": {name: {} for name in classifiers}}, **extra}))
    return path


def test_the_example_plugin_passes_scikit_learns_own_estimator_checks(plugin_dir):
    import shrunken_centroid
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(shrunken_centroid.ShrunkenCentroid(shrink=0.3), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert len(results) > 40 and not failed, failed


def test_a_plugin_classifier_is_searched_recorded_exported_and_loaded_like_a_built_in(plugin_dir, tmp_path):
    from adsearch.results.model_files import load_model
    from adsearch.results.schema import load_config
    from adsearch.search.setup import StudySetup

    url = f"sqlite:///{tmp_path / 's.db'}"
    result = run("search", "--cache", _cache(tmp_path), "--study", "p", "--space", _space(tmp_path), "--storage", url,
                 "--trials", 12, "--workers", 2, "--plugins", "shrunken_centroid")
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="p", storage=url)
    setup = StudySetup.from_study(study)
    assert setup.spec.plugins == ["shrunken_centroid"]
    attr = study._storage.get_study_system_attrs(study._study_id)["adsearch"]
    assert set(attr["plugins"]) == {"shrunken_centroid"}
    assert re.fullmatch(r"files:[0-9a-f]{64}", attr["plugins"]["shrunken_centroid"])
    chosen = [t for t in study.trials if t.params.get("classifier") == "shrunken_centroid" and t.state.is_finished()]
    assert chosen, "the plugin classifier was never tried"
    result = run("export", "--study", "p", "--storage", url, "-o", tmp_path / "best", "--trial", chosen[0].number)
    assert result.exit_code == 0, result.output
    config = load_config(tmp_path / "best")
    assert config.pipeline.classifier == "shrunken_centroid" and set(config.plugins) == {"shrunken_centroid"}
    model = load_model(tmp_path / "best" / "model.skops", config.plugins)  # what predict does
    assert type(model.steps[-1][1]).__name__ == "ShrunkenCentroid"
    result = run("evaluate", tmp_path / "best")
    assert result.exit_code == 0 and "reproduced exactly" in result.output, result.output


def test_a_study_and_an_export_refuse_plugin_code_that_changed(plugin_dir, tmp_path):
    from adsearch.results.schema import load_config
    from adsearch.search.setup import StudySetup

    url = f"sqlite:///{tmp_path / 's.db'}"
    space = _space(tmp_path, ["shrunken_centroid"], plugins=["shrunken_centroid"])
    result = run("search", "--cache", _cache(tmp_path), "--study", "p", "--space", space, "--storage", url,
                 "--trials", 4)
    assert result.exit_code == 0, result.output
    result = run("export", "--study", "p", "--storage", url, "-o", tmp_path / "best")
    assert result.exit_code == 0, result.output
    source = plugin_dir / "shrunken_centroid.py"
    source.write_text(source.read_text().replace("1e-6", "1e-3"))
    with pytest.raises(Exception, match="other code of the plugin module"):
        StudySetup.from_study(optuna.load_study(study_name="p", storage=url))
    result = run("worker", "--study", "p", "--storage", url)
    assert result.exit_code == 2 and "other code of the plugin module(s) shrunken_centroid" in result.output
    with pytest.raises(ValueError, match="other code of the plugin module"):
        load_config(tmp_path / "best")
    result = run("predict", tmp_path / "best", tmp_path / "any.wav")
    assert result.exit_code == 2 and "other code of the plugin module(s) shrunken_centroid" in result.output


def test_a_plugin_that_breaks_the_estimator_contract_is_refused_where_it_is_named(plugin_dir, tmp_path):
    (plugin_dir / "broken_plugin.py").write_text('''
from sklearn.base import BaseEstimator, ClassifierMixin
from adsearch.search.classifiers import FloatRange, register

class NoSelf(ClassifierMixin, BaseEstimator):
    def __init__(self, c=1.0):
        self.c = c
    def fit(self, X, y):
        self.classes_ = sorted(set(y))
    def predict(self, X):
        return [0] * len(X)
    def predict_proba(self, X):
        return [[0.5, 0.5]] * len(X)

@register("no_self", "fit returns None", {"c": FloatRange(0.1, 1.0, above=0)})
def _build(p, seed):
    return NoSelf(c=p["c"])
''')
    space = _space(tmp_path)
    result = run("space", "check", space, "--plugins", "broken_plugin")
    assert result.exit_code == 2 and "plugin classifier 'no_self' (broken_plugin): fit() must return self" in \
        " ".join(result.output.split()), result.output
    assert "no_self" not in REGISTRY
    result = run("space", "check", space, "--plugins", "no_such_module_here")
    assert result.exit_code == 2 and "cannot import 'no_such_module_here'" in result.output
    assert "PYTHONPATH" in result.output
    result = run("space", "check", space, "--plugins", "os; rm -rf /")
    assert result.exit_code == 2 and "is not a Python module name" in result.output


def test_a_plugin_cannot_take_a_built_in_name(plugin_dir, tmp_path):
    (plugin_dir / "takes_logreg.py").write_text('''
from sklearn.dummy import DummyClassifier
from adsearch.search.classifiers import Choice, register

@register("logreg", "not adsearch's logreg", {"strategy": Choice(("prior",))})
def _build(p, seed):
    return DummyClassifier(strategy=p["strategy"])
''')
    own = REGISTRY["logreg"]
    result = run("space", "check", _space(tmp_path), "--plugins", "takes_logreg")
    assert result.exit_code == 2, result.output
    assert "the name 'logreg' belongs to adsearch's own classifier" in " ".join(result.output.split())
    assert REGISTRY["logreg"] is own


def test_a_change_in_a_module_the_plugin_imports_is_refused_like_one_in_the_plugin(plugin_dir, tmp_path):
    from adsearch.search.plugins import PluginError, check_digests, load_plugins

    (plugin_dir / "helper_scale.py").write_text("FACTOR = 1.0\n")
    (plugin_dir / "with_helper.py").write_text(EXAMPLE.read_text().replace(
        "shrunken_centroid", "helper_centroid").replace("from __future__ import annotations",
                                                        "from __future__ import annotations\nimport helper_scale"))
    recorded = load_plugins(["with_helper"])
    check_digests(recorded, "study 's'")  # unchanged: accepted
    (plugin_dir / "helper_scale.py").write_text("FACTOR = -1.0\n")
    with pytest.raises(PluginError, match="with_helper"):
        check_digests(recorded, "study 's'")


def test_an_installed_entry_point_plugin_needs_no_option_and_is_recorded(plugin_dir):
    from adsearch.search.plugins import installed_plugins
    from adsearch.search.space import parse_spec

    info = plugin_dir / "adsearch_centroid-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: adsearch-centroid\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[adsearch.classifiers]\nshrunken_centroid = shrunken_centroid\n")
    assert installed_plugins() == ["shrunken_centroid"]
    spec = parse_spec({"space": {"classifiers": {"shrunken_centroid": {"shrink": 0.5}}}})
    assert spec.plugins == ["shrunken_centroid"]  # recorded, so workers import it by name


def test_a_broken_installed_plugin_stops_only_the_spaces_that_look_for_a_model_it_might_hold(plugin_dir):
    from adsearch.search.space import SpaceError, parse_spec

    (plugin_dir / "broken_plugin.py").write_text("raise RuntimeError('half-installed')\n")
    info = plugin_dir / "adsearch_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: adsearch-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[adsearch.classifiers]\nbroken = broken_plugin\n")
    assert parse_spec({"space": {"classifiers": {"logreg": {}, "knn": {}}}}).plugins == []
    with pytest.raises(SpaceError, match="importing 'broken_plugin' failed: RuntimeError: half-installed"):
        parse_spec({"space": {"classifiers": {"my_model": {}}}})


def test_only_estimator_classes_the_plugin_defines_are_trusted_in_a_model_file(plugin_dir):
    from adsearch.results.model_files import plugin_estimator_types
    from adsearch.search.plugins import load_plugins

    digests = load_plugins(["shrunken_centroid"])
    names = ["shrunken_centroid.ShrunkenCentroid", "shrunken_centroid.np", "shrunken_centroid.BaseEstimator",
             "shrunken_centroid.register", "os.system", "builtins.eval"]
    assert plugin_estimator_types(names, digests) == {"shrunken_centroid.ShrunkenCentroid"}
    assert plugin_estimator_types(names, {}) == set()


def test_the_scripted_example_runs_a_study_through_the_python_api(tmp_path):
    script = Path(__file__).parents[1] / "examples" / "scripted_study.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.fullmatch(r"ran \d+ trials; best CV 0\.\d+; test balanced accuracy [01]\.\d+ \(\w+\)\n", done.stdout)
    assert {"config.yaml", "model.skops", "report.html"} <= {p.name for p in (tmp_path / "out" / "best").iterdir()}


def test_a_plugin_regressor_serves_mmse_spaces_and_a_classifier_posing_as_one_is_refused(plugin_dir):
    from adsearch.search.space import SpaceError, parse_spec

    (plugin_dir / "broken_plugin.py").write_text('''
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import Lasso
from adsearch.search.classifiers import FloatRange, register

@register("lasso", "L1-penalised least squares", {"alpha": FloatRange(0.01, 1.0, above=0)}, task="mmse")
def _lasso(p, seed):
    return Lasso(alpha=p["alpha"])

@register("not_a_regressor", "a classifier", {"alpha": FloatRange(0.01, 1.0, above=0)}, task="mmse")
def _classifier(p, seed):
    return DummyClassifier()
''')
    with pytest.raises(SpaceError, match="plugin regressor 'not_a_regressor' .*not a scikit-learn regressor"):
        parse_spec({"task": "mmse", "plugins": ["broken_plugin"]})
    assert "lasso" in REGISTRY and "not_a_regressor" not in REGISTRY  # registered before the broken one
    spec = parse_spec({"task": "mmse", "space": {"classifiers": {"lasso": {}}}})
    assert spec.space.classifiers == {"lasso": {}} and spec.plugins == ["broken_plugin"]
