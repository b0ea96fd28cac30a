from pathlib import Path

import optuna
import pytest

from adsearch.search.classifiers import REGISTRY, models_for
from adsearch.search.space import SpaceError, check_layers, load_spec, parse_spec, suggest

DEFAULT = Path(__file__).parent.parent / "studies" / "default.yaml"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_default_space_is_valid_and_covers_every_registered_classifier():
    spec = load_spec(DEFAULT)
    assert set(spec.space.classifiers) == set(models_for("classification"))
    assert spec.cv.metric == "balanced_accuracy" and spec.sampler == "tpe" and spec.pruner == "none"
    assert spec.screen.enabled and spec.screen.top == 10
    assert check_layers(spec, 25) == tuple(range(25))


def test_digest_ignores_formatting_but_not_content(tmp_path):
    a = load_spec(write(tmp_path, "cv: {folds: 5}\n# comment\nseed: 0\n"))
    b = parse_spec({"seed": 0, "cv": {"folds": 5, "repeats": 1}})
    c = parse_spec({"seed": 1})
    assert a.digest() == b.digest() != c.digest()


@pytest.mark.parametrize("text,expected", [
    ("cv: {metric: auc}", "cv.metric: Input should be 'balanced_accuracy', 'accuracy', 'f1', 'roc_auc', 'rmse'"),
    ("cv: {folds: 1}", "cv.folds: Input should be greater than or equal to 2"),
    ("samplr: tpe", "samplr: Extra inputs are not permitted"),
    ("sampler: cmaes", "sampler: Input should be 'tpe', 'random', 'layer-grid', 'gp' or 'qmc'"),
    ("space: {pooling: [mean, median]}", "space.pooling.1: Input should be"),
    ("space: {pooling: []}", "space.pooling: needs at least one entry"),
    ("space: {layers: {low: 10, high: 2}}", "low (10) is above high (2)"),
    ("space: {pca_variance: {low: 0.5, high: 1.0}}", "explained variance must lie strictly between 0 and 1"),
    ("space: {classifiers: {svm: {}}}", "space.classifiers.svm: unknown model; available for task classification: "
                                        "logreg"),
    ("space: {classifiers: {logreg: {penalty: l1}}}", "unknown hyperparameter(s) ['penalty']; logreg has ['C']"),
    ("space: {classifiers: {logreg: {C: {low: 0, high: 1, log: true}}}}", "logreg.C: range: Value error, a log"),
    ("space: {classifiers: {knn: {weights: {low: 1, high: 2}}}}", "knn.weights: weights is categorical"),
    ("space: {classifiers: {knn: {weights: [uniform, closest]}}}", "'closest' is not one of ['uniform', 'distance']"),
    ("space: {classifiers: {knn: {n_neighbors: 2.5}}}", "knn.n_neighbors: 2.5 is not an integer"),
    ("layer_grid: {classifier: logreg, params: {}}", "layer_grid.params: logreg needs exactly ['C']"),
    ("[1, 2]", "the top level must be a mapping"),
    ("cv: {folds: [", "not valid YAML"),
])
def test_validation_errors_name_file_key_and_what_is_allowed(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_missing_file_and_layers_outside_the_cache(tmp_path, monkeypatch):
    with pytest.raises(SpaceError, match="space file not found; pass --space FILE"):
        load_spec(tmp_path / "nope.yaml")
    monkeypatch.chdir(tmp_path)  # the default space is found from any working folder
    assert load_spec("studies/default.yaml").digest() == load_spec(DEFAULT).digest()
    spec = parse_spec({"space": {"layers": {"low": 2, "high": 30}}})
    with pytest.raises(SpaceError, match="2..30 is outside the cache's layers 0..24"):
        check_layers(spec, 25)
    with pytest.raises(SpaceError, match=r"\[40\] outside"):
        check_layers(parse_spec({"space": {"layers": [3, 40]}}), 25)


def test_space_only_proposes_valid_conditional_parameters():
    spec = parse_spec({
        "space": {
            "layers": {"low": 2, "high": 7}, "pca": ["none", "components", "variance"],
            "unit": ["recording", "window"], "l2_normalize": [True, False],
            "classifiers": {name: {} for name in models_for("classification")}
            | {"knn": {"weights": "distance", "n_neighbors": [3, 5]}},
        }
    })
    layers = check_layers(spec, 25)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(400):
        trial = study.ask()
        config = suggest(trial, spec, layers)
        params = trial.params
        seen.add(config.classifier)
        assert 2 <= config.layer <= 7
        assert ("pca_components" in params) == (config.pca == "components")
        assert ("pca_variance" in params) == (config.pca == "variance")
        own = {k for k in params if "." in k}
        assert own == {f"{config.classifier}.{p}" for p in config.params} - {"knn.weights"}
        assert set(config.params) == set(REGISTRY[config.classifier].params)
        if config.classifier == "knn":
            assert config.params["weights"] == "distance" and config.params["n_neighbors"] in (3, 5)
        for name, value in config.params.items():
            default = REGISTRY[config.classifier].params[name]
            if hasattr(default, "low") and not (config.classifier == "knn" and name == "n_neighbors"):
                assert default.low <= value <= default.high
        study.tell(trial, 0.5)
    assert seen == set(models_for("classification"))
