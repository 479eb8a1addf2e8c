"""One download spread over a Dask cluster: the input cut into parts, each an ordinary run.

``download_on_cluster`` is what ``fetchpool get --cluster`` and ``download(cluster=...)`` call;
dask.distributed is imported only then (``pip install 'fetchpool[dask]'``).
See docs/distributed.md.
"""

from __future__ import annotations

from fetchpool.cluster.driver import download_on_cluster

__all__ = ["download_on_cluster"]
