"""Groups from duplicate pairs, vectorised for millions of rows."""

from __future__ import annotations

import numpy as np


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Label each of ``n`` items with the smallest index of its group, given an (m, 2) array of pairs.

    Items in no pair are their own group. Uses scipy's sparse connected components (linear time).
    """
    labels = np.arange(n, dtype=np.int64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if n == 0 or len(pairs) == 0:
        return labels
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_cc

    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = scipy_cc(graph, directed=False)
    # Name each component by its smallest member, so labels do not depend on scipy's numbering.
    first = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, component, labels)
    return first[component]
