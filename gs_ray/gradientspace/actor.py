"""The clustering actor: the one `OnlineSVDClusterer` every gradient worker sends its cache summaries to.

A plain class; the cluster stage wraps it with `ray.remote` where it starts it.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np

from gs_ray.config import ClusterConfig
from gs_ray.core import storage
from gs_ray.gradientspace.cluster import OnlineSVDClusterer, VersionToken

logger = logging.getLogger(__name__)


class ClusterActor:
    """The central clusterer behind a Ray actor (wrapped with `ray.remote` where it is started).

    Workers send it cache summaries and fetch the centroid rows changed since the version
    they hold; it never sees a per-sample gradient. Given a checkpoint path, it saves its
    state there every cluster.checkpoint_every summaries and, when Ray restarts it (by
    running this constructor again with the same arguments), resumes from that save
    instead of from `state`. Summaries applied after the last save are lost with the
    process; the assignments are not, since those leave the workers as data rows.
    """

    def __init__(self, cfg: ClusterConfig, state: dict, checkpoint_path: str = ""):
        self.clusterer = OnlineSVDClusterer(cfg, seed=int(state["seed"]))
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.checkpoint_every = cfg.checkpoint_every
        self.resumed_from_version: int | None = None
        if self.checkpoint_path is not None and self.checkpoint_path.is_file():
            with np.load(self.checkpoint_path, allow_pickle=False) as saved:
                self.clusterer.load_state_dict(saved)
            self.resumed_from_version = self.clusterer.version
            logger.warning("clustering actor restarted from its checkpoint at version %d", self.clusterer.version)
        else:
            self.clusterer.load_state_dict(state)
        # A restarted actor may be behind versions it handed out before it died; versions
        # are only comparable within one incarnation, so a stale one gets every row again.
        self.incarnation = uuid.uuid4().hex
        self.changed_at = np.full(self.clusterer.k, self.clusterer.version, dtype=np.int64)
        self.unsaved = 0

    def changed_since(self, token: VersionToken | None) -> tuple[VersionToken, dict[int, np.ndarray], np.ndarray | None]:
        """(current version token, {k: centroid} changed after `token`, feature mean).

        None, or a token from before a restart, gets every row and the mean.
        """
        clusterer = self.clusterer
        version = token[1] if token is not None and token[0] == self.incarnation else -1
        # Every row has changed_at >= 0, so version -1 gets them all.
        changed = {k: clusterer.centroids[k].copy() for k in np.flatnonzero(self.changed_at > version).tolist()}
        return (self.incarnation, clusterer.version), changed, clusterer.features.mean if version < 0 else None

    def apply_summaries(self, summaries: list[tuple[int, np.ndarray]]) -> int:
        for k, vector in summaries:
            self.clusterer.apply_summary(k, vector)
            self.changed_at[k] = self.clusterer.version
        self.unsaved += len(summaries)
        if self.checkpoint_path is not None and self.unsaved >= self.checkpoint_every:
            self._save()
        return self.clusterer.version

    def _save(self) -> None:
        """Write the state to a temporary file, then rename it over the checkpoint: a kill mid-write keeps the old one."""
        state = self.clusterer.state_dict()
        storage.write_atomic(self.checkpoint_path, lambda handle: np.savez(handle, **state))
        self.unsaved = 0

    def resumed_from(self) -> int | None:
        """The checkpoint version this incarnation started from; None if it started from the initial state."""
        return self.resumed_from_version

    def state_dict(self) -> dict:
        return self.clusterer.state_dict()
