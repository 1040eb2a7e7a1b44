"""Fusion of image probabilities with a Hall-sensor reading: p(|B| | class) and the posterior."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sorter.core.fusion import FieldLikelihood, FieldModelError, fuse

pytestmark = pytest.mark.fast

LABELS = ("ndfeb", "ferrite", "smco", "steel", "other")


def _readings(seed: int = 0, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Domain-like readings: NdFeB and SmCo strong, ferrite weak, steel a few mT, other noise; signed."""
    rng = np.random.default_rng(seed)
    f = np.concatenate(
        [
            rng.lognormal(math.log(200), 0.5, n),
            rng.lognormal(math.log(40), 0.4, n),
            rng.lognormal(math.log(150), 0.4, n),
            np.abs(rng.normal(2, 2, n)),
            np.abs(rng.normal(0, 0.8, n)),
        ]
    )
    f *= rng.choice([-1.0, 1.0], f.size)
    return f, np.repeat(np.arange(5), n)


@pytest.fixture(scope="module")
def lik() -> FieldLikelihood:
    f, y = _readings()
    return FieldLikelihood.fit(LABELS, f, y)


def test_fit_separates_the_classes(lik: FieldLikelihood) -> None:
    assert lik.labels == LABELS
    assert lik.counts == [200] * 5
    best = {b: LABELS[int(np.argmax(lik.log_likelihood(b)))] for b in (0.3, 40.0, 250.0)}
    assert best[0.3] in ("steel", "other")
    assert best[40.0] == "ferrite"
    assert best[250.0] in ("ndfeb", "smco")
    # the sign of the field says nothing about the material
    assert np.allclose(lik.log_likelihood(-250.0), lik.log_likelihood(250.0))


def test_strong_reading_resolves_epoxy_ndfeb_against_ferrite(lik: FieldLikelihood) -> None:
    image = np.array([0.45, 0.5, 0.02, 0.02, 0.01])  # a small glossy black piece: NdFeB or ferrite?
    assert np.argmax(fuse(image, 300.0, lik)) == 0
    assert np.argmax(fuse(image, 35.0, lik)) == 1


def test_missing_reading_changes_nothing(lik: FieldLikelihood) -> None:
    image = np.array([0.5, 0.2, 0.1, 0.1, 0.1])
    assert np.array_equal(fuse(image, None, lik), image)
    assert np.array_equal(fuse(image, math.nan, lik), image)
    batch = np.tile(image, (3, 1))
    out = fuse(batch, [None, 200.0, math.nan], lik)
    assert np.array_equal(out[0], image) and np.array_equal(out[2], image)
    assert not np.allclose(out[1], image)
    assert np.all(lik.log_likelihood(None) == 0)
    assert np.array_equal(fuse(batch, [1.0, 2.0, 3.0], None), batch)  # a model without field likelihood


def test_classes_without_readings_are_flat() -> None:
    f, y = _readings()
    keep = y != 2  # no SmCo readings
    lik = FieldLikelihood.fit(LABELS, f[keep], y[keep])
    assert lik.counts[2] == 0
    ll = lik.log_likelihood(np.array([0.0, 10.0, 100.0, 1000.0]))
    assert np.allclose(ll[:, 2], ll[0, 2])  # the same for every reading


def test_json_round_trip(lik: FieldLikelihood) -> None:
    back = FieldLikelihood.from_json(lik.to_json())
    assert back.labels == lik.labels
    assert back.contamination == lik.contamination
    grid = np.concatenate([np.linspace(-500, 500, 101), [0.0, 1e-3, 1e4]])
    assert np.allclose(back.log_likelihood(grid), lik.log_likelihood(grid), atol=1e-5)


@pytest.mark.parametrize(
    "text",
    ["not json", "[1, 2]", '{"kind": "other"}', '{"kind": "log1p-kde", "labels": ["a"]}'],
)
def test_bad_json_is_refused(text: str) -> None:
    with pytest.raises(FieldModelError):
        FieldLikelihood.from_json(text)


def test_reordered_follows_the_labels(lik: FieldLikelihood) -> None:
    order = ("other", "steel", "smco", "ferrite", "ndfeb", "unknown")
    r = lik.reordered(order)
    ll, rl = lik.log_likelihood(120.0), r.log_likelihood(120.0)
    assert np.allclose(rl[:5], ll[::-1])
    image = np.array([0.1, 0.2, 0.3, 0.2, 0.2])
    assert np.allclose(fuse(image, 120.0, lik, labels=LABELS), fuse(image, 120.0, lik))


probs_row = arrays(np.float64, 5, elements=st.floats(1e-6, 1.0)).map(lambda a: a / a.sum())
readings = st.one_of(st.none(), st.just(math.nan), st.floats(-5000, 5000, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(p=probs_row, b=readings)
def test_posterior_is_a_distribution_and_no_class_is_zeroed(lik: FieldLikelihood, p: np.ndarray, b: float) -> None:
    post = fuse(p, b, lik)
    assert post.shape == p.shape
    assert np.all(np.isfinite(post))
    assert post.sum() == pytest.approx(1.0, abs=1e-9)
    # a single reading shifts the odds by a bounded factor: nothing the image allows becomes impossible
    assert np.all(post > 0)
    bound = math.exp(lik.max_log_ratio())
    assert np.all(post / p <= bound * (1 + 1e-9))
    assert np.all(post / p >= 1 / bound * (1 - 1e-9))
    if b is None or math.isnan(b):
        assert np.array_equal(post, p)


@settings(max_examples=50, deadline=None)
@given(
    fields=arrays(np.float64, st.integers(1, 30), elements=st.floats(-1000, 1000)),
    contamination=st.sampled_from([0.005, 0.03, 0.2]),
)
def test_any_plant_data_fits(fields: np.ndarray, contamination: float) -> None:
    """Whatever the readings (few, equal, huge), the fit is finite and bounded."""
    y = np.arange(fields.size) % 3
    lik = FieldLikelihood.fit(("a", "b", "c"), fields, y, contamination=contamination)
    ll = lik.log_likelihood(np.array([0.0, 1.0, 50.0, 1e5, -3.0]))
    assert np.all(np.isfinite(ll))
    assert math.isfinite(lik.max_log_ratio())
    post = fuse(np.full((5, 3), 1 / 3), np.array([0.0, 1.0, 50.0, 1e5, -3.0]), lik)
    assert np.allclose(post.sum(axis=1), 1.0) and np.all(post > 0)


def test_shape_errors(lik: FieldLikelihood) -> None:
    with pytest.raises(ValueError):
        fuse(np.full(4, 0.25), 10.0, lik)
    with pytest.raises(ValueError):
        fuse(np.full((3, 5), 0.2), [1.0, 2.0], lik)
    with pytest.raises(FieldModelError):
        FieldLikelihood.fit(LABELS, [1.0, 2.0], [0])


def _sized_readings(seed: int = 1, n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Readings that grow with the piece (as the square root of its area): ferrite a fifth of NdFeB,
    steel and other ~0; areas 10-400 mm² for every class."""
    rng = np.random.default_rng(seed)
    area = rng.uniform(10, 400, 5 * n)
    y = np.repeat(np.arange(5), n)
    scale = np.array([12.0, 2.4, 10.0, 0.0, 0.0])[y]
    f = scale * np.sqrt(area) * rng.lognormal(0, 0.15, y.size) + np.abs(rng.normal(0, 0.8, y.size))
    return f, y, area


def test_size_bands_judge_a_reading_among_pieces_of_that_size() -> None:
    f, y, area = _sized_readings()
    overall = FieldLikelihood.fit(LABELS, f, y)
    sized = FieldLikelihood.fit(LABELS, f, y, area_mm2=area)
    assert len(sized.size_edges_mm2) == 2 and overall.size_edges_mm2 == []
    # 45 mT: typical of a small NdFeB bit (15 mm²) and of a big ferrite piece (350 mm²)
    small, big = sized.log_likelihood(45.0, 15.0), sized.log_likelihood(45.0, 350.0)
    assert np.argmax(small[:2]) == 0 and np.argmax(big[:2]) == 1
    assert np.argmax(overall.log_likelihood(45.0)[:2]) == 1  # overall, 45 mT looks like ferrite
    # without an area (or with a bad one) the overall densities decide, as in a model fitted without areas
    assert np.allclose(sized.log_likelihood(45.0), overall.log_likelihood(45.0))
    assert np.allclose(sized.log_likelihood([45.0, 45.0], [None, -1.0]), overall.log_likelihood([45.0, 45.0]))
    image = np.array([0.5, 0.5, 0.0, 0.0, 0.0]) + 1e-3
    both = np.tile(image, (2, 1))
    assert np.argmax(fuse(both, [45.0, 45.0], sized, area_mm2=[15.0, 350.0]), axis=1).tolist() == [0, 1]


def test_size_bands_survive_json_and_reordering() -> None:
    f, y, area = _sized_readings()
    lik = FieldLikelihood.fit(LABELS, f, y, area_mm2=area)
    back = FieldLikelihood.from_json(lik.to_json())
    grid, areas = np.linspace(-300, 300, 61), np.linspace(5, 500, 61)
    assert back.size_edges_mm2 == lik.size_edges_mm2
    assert np.allclose(back.log_likelihood(grid, areas), lik.log_likelihood(grid, areas), atol=1e-5)
    r = lik.reordered(LABELS[::-1])
    assert np.allclose(r.log_likelihood(grid, areas), lik.log_likelihood(grid, areas)[:, ::-1])
    # a version-1 reader's view (no size keys) is the overall likelihood
    import json

    d = json.loads(lik.to_json())
    del d["size_edges_mm2"], d["density_by_size"]
    assert np.allclose(
        FieldLikelihood.from_json(json.dumps(d)).log_likelihood(grid), lik.log_likelihood(grid), atol=1e-5
    )


def test_a_band_with_few_readings_of_a_class_uses_its_overall_density() -> None:
    f, y, area = _sized_readings()
    keep = ~((y == 1) & (area < 200))  # no small ferrite
    lik = FieldLikelihood.fit(LABELS, f[keep], y[keep], area_mm2=area[keep])
    overall = FieldLikelihood.fit(LABELS, f[keep], y[keep])
    small = lik.log_likelihood(np.linspace(0, 300, 31), 12.0)
    assert np.allclose(small[:, 1], overall.log_likelihood(np.linspace(0, 300, 31))[:, 1])
    with pytest.raises(FieldModelError):
        FieldLikelihood.fit(LABELS, f, y, area_mm2=area[:10])
    with pytest.raises(FieldModelError):
        FieldLikelihood(LABELS, np.ones((5, 8)), size_edges_mm2=[50.0, 20.0], density_by_size=np.ones((3, 5, 8)))


def test_a_class_with_few_readings_gets_a_broad_density() -> None:
    # a plant's rare class (three SmCo readings, close together) beside classes with hundreds: its density must
    # not be a sharp peak that makes a SmCo reading a little off those three look impossible for SmCo
    f, y = _readings(n=300)
    keep = (y != 2) | (np.cumsum(y == 2) <= 3)
    lik = FieldLikelihood.fit(LABELS, f[keep], y[keep], contamination=0.01)
    assert lik.counts[2] == 3
    smco_readings = np.abs(f[keep][y[keep] == 2])
    off = float(np.max(smco_readings)) * 1.6  # 60 % stronger than the strongest of the three
    near, far = lik.log_likelihood(float(np.median(smco_readings)))[2], lik.log_likelihood(off)[2]
    assert near - far < math.log(8)  # the few readings favour their own values only mildly
    # hundreds of readings keep their shape: the well-known classes still separate sharply
    ferrite = lik.log_likelihood(40.0)
    assert ferrite[1] - ferrite[0] > math.log(8)
