"""The clustering actor: the `OnlineSVDClusterer` every gradient worker sends its cache summaries to.

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

    With `streams` > 1 it holds one independent clusterer per stream (each gradient worker
    owns one stream and a fixed share of the samples), all started from `state`;
    `finish_stream` merges them in stream order. So the result depends on which samples
    each stream holds, never on how the workers' calls interleave.
    """

    def __init__(self, cfg: ClusterConfig, state: dict, checkpoint_path: str = "", streams: int = 1):
        self.cfg = cfg
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.checkpoint_every = cfg.checkpoint_every
        self.resumed_from_version: int | None = None
        if self.checkpoint_path is not None and self.checkpoint_path.is_file():
            with np.load(self.checkpoint_path, allow_pickle=False) as saved:
                states = [_unprefixed(saved, j) for j in range(int(saved["streams"]))]
            self.resumed_from_version = max(int(one["version"]) for one in states)
            logger.warning("clustering actor restarted from its checkpoint at version %d", self.resumed_from_version)
        else:
            states = [state] * (1 + (streams if streams > 1 else 0))
        # With several streams, clusterers[0] is where they all started and [1:] are the streams;
        # with one, clusterers[0] is the stream itself (so one worker reproduces partial_fit exactly).
        self.clusterers = [self._clusterer(one) for one in states]
        # A restarted actor may be behind versions it handed out before it died; versions
        # are only comparable within one incarnation, so a stale one gets every row again.
        self.incarnation = uuid.uuid4().hex
        self.changed_at = [np.full(c.k, c.version, dtype=np.int64) for c in self.clusterers]
        self.unsaved = 0

    def _clusterer(self, state) -> OnlineSVDClusterer:
        clusterer = OnlineSVDClusterer(self.cfg, seed=int(state["seed"]))
        clusterer.load_state_dict(state)
        return clusterer

    @property
    def clusterer(self) -> OnlineSVDClusterer:
        """The clusterer assignments are made against once the stream is over."""
        return self.clusterers[0]

    def _stream(self, stream: int) -> int:
        """Index into clusterers of stream `stream` (0 when there is one stream)."""
        if not 0 <= stream < max(len(self.clusterers) - 1, 1):
            raise ValueError(f"stream {stream} is not one of this actor's {max(len(self.clusterers) - 1, 1)}")
        return stream + 1 if len(self.clusterers) > 1 else 0

    def changed_since(self, token: VersionToken | None,
                      stream: int = 0) -> tuple[VersionToken, dict[int, np.ndarray], np.ndarray | None]:
        """(current version token, {k: centroid} changed after `token`, feature mean) of one stream.

        None, or a token from before a restart, gets every row and the mean.
        """
        index = self._stream(stream)
        clusterer, changed_at = self.clusterers[index], self.changed_at[index]
        version = token[1] if token is not None and token[0] == self.incarnation else -1
        # Every row has changed_at >= 0, so version -1 gets them all.
        changed = {k: clusterer.centroids[k].copy() for k in np.flatnonzero(changed_at > version).tolist()}
        return (self.incarnation, clusterer.version), changed, clusterer.features.mean if version < 0 else None

    def apply_summaries(self, summaries: list[tuple[int, np.ndarray]], stream: int = 0) -> int:
        index = self._stream(stream)
        clusterer = self.clusterers[index]
        for k, vector in summaries:
            clusterer.apply_summary(k, vector)
            self.changed_at[index][k] = clusterer.version
        self.unsaved += len(summaries)
        if self.checkpoint_path is not None and self.unsaved >= self.checkpoint_every:
            self._save()
        return clusterer.version

    def finish_stream(self) -> int:
        """Merge the streams, in stream order, into the one clusterer later passes assign against."""
        if len(self.clusterers) > 1:
            merged, streams = self.clusterers[0], self.clusterers[1:]
            merged.merge_streams(streams)
            self.clusterers = [merged]
            self.changed_at = [np.full(merged.k, merged.version, dtype=np.int64)]
            if self.checkpoint_path is not None:
                self._save()
        return self.clusterer.version

    def _save(self) -> None:
        """Write the state to a temporary file, then rename it over the checkpoint: a kill mid-write keeps the old one."""
        state = {"streams": len(self.clusterers)}
        for j, clusterer in enumerate(self.clusterers):
            state |= {f"{j}/{key}": value for key, value in clusterer.state_dict().items()}
        storage.write_atomic(self.checkpoint_path, lambda handle: np.savez(handle, **state))
        self.unsaved = 0

    def resumed_from(self) -> int | None:
        """The checkpoint version this incarnation started from; None if it started from the initial state."""
        return self.resumed_from_version

    def state_dict(self) -> dict:
        return self.clusterer.state_dict()


def _unprefixed(saved, j: int) -> dict:
    """Clusterer j's state out of a checkpoint that holds several under "j/..." keys."""
    prefix = f"{j}/"
    return {key[len(prefix):]: saved[key] for key in saved.files if key.startswith(prefix)}
