"""The Ward cut of a home history is relative to the history's own scale (home.ward_threshold).

Hand-made histories: three groups of m points at the corners of an equilateral triangle of side d,
each group's points a tiny step (0.01 d) apart along their own axes, so every group's centroid is its
corner shifted by the same vector. Ward's merge height of two clusters of sizes a and b whose
centroids are D apart is sqrt(2ab / (a + b)) * D: two groups of m merge at sqrt(m) * d, and the third
group then joins the merged pair (centroid distance sqrt(3) / 2 * d) at sqrt(4m / 3) * sqrt(3) / 2 * d
= sqrt(m) * d as well. Most pairs lie between groups, so the median pairwise distance is d (to 1e-4).
With the default factor 1.5: groups of 3 (sqrt(3) = 1.73 > 1.5) stay 3 clusters and groups of 2
(sqrt(2) = 1.41 < 1.5) become 1, at every scale d; a fixed cut at 1.0 (the rule before) gives 1 or 3
depending on d alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from itemsage.index import by_product, home


def triangle_history(m: int, d: float) -> np.ndarray:
    """[3m, 2 + 3m]: group g's m points at corner g (side d), point i of the group + 0.01 d on axis 2 + i."""
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]]) * d
    x = np.zeros((3 * m, 2 + 3 * m))
    for g in range(3):
        for i in range(m):
            x[g * m + i, :2] = corners[g]
            x[g * m + i, 2 + i] = 0.01 * d  # the same offsets in every group: centroids stay d apart
    return x


def test_ward_threshold_is_the_factor_times_the_median_pairwise_distance():
    x = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # distances 3, 4, 5: median 4
    assert home.ward_threshold(x, 1.5) == pytest.approx(6.0)
    assert home.ward_threshold(x) == pytest.approx(home.WARD_RELATIVE_THRESHOLD * 4.0)
    assert home.ward_threshold(x[:1]) == 0.0
    assert home.WARD_RELATIVE_THRESHOLD == 1.5  # the hand-made cases below are derived for 1.5


@pytest.mark.parametrize("d", [0.05, 0.3, 1.0, 10.0])
def test_relative_cut_gives_the_same_clusters_at_every_scale(d):
    labels, medoids = home.cluster_history(triangle_history(3, d), max_clusters=5)
    assert sorted(np.bincount(labels).tolist()) == [3, 3, 3]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # one cluster per group, numbered by first member
    assert len(medoids) == 3
    labels, _ = home.cluster_history(triangle_history(2, d), max_clusters=5)
    assert labels.tolist() == [0] * 6  # sqrt(2) d < 1.5 d: one interest


@pytest.mark.parametrize("d, clusters", [(0.05, 1), (0.3, 1), (1.0, 3), (10.0, 3)])
def test_a_fixed_cut_depends_on_the_scale(d, clusters):
    """The rule before: an absolute cut at 1.0 merges the groups (sqrt(3) d < 1) at small scales only."""
    labels, _ = home.cluster_history(triangle_history(3, d), max_clusters=5, threshold=1.0)
    assert labels.max() + 1 == clusters


def test_the_served_plan_uses_the_relative_cut_on_unit_rows():
    """plan_home clusters unit rows: a history whose three interests are close directions (cosine
    about 0.999) still splits into three, where the fixed cut at 1.0 would see one."""
    base = np.zeros(2 + 9)
    base[-1] = 1.0  # an axis the triangle does not use
    x = triangle_history(3, 0.04) + base  # near one direction; unit rows keep the groups apart
    labels, medoids, weight = by_product.plan_home(x, max_clusters=5)
    assert sorted(np.bincount(labels).tolist()) == [3, 3, 3] and weight.tolist() == [3.0, 3.0, 3.0]
    labels, _, _ = by_product.plan_home(x, max_clusters=5, ward_threshold=1.0)
    assert labels.max() == 0
