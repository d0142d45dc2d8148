"""Stage II on Ray: stream the training split's gradients past the ClusterActor.

1. Validation: a Ray Data actor pool (`GradientWorker`, mode "gradients") computes the
   gradients of up to cluster.max_val_samples validation samples; the driver writes them
   into a memory-mapped file (m x d, bounded by config, deleted afterwards) from which
   `OnlineSVDClusterer.fit_validation` picks K and the initial centroids.
2. Stream: the same pool (mode "stream") runs over the training split. Each worker keeps
   a replica of the centroids, assigns its samples locally, fills its own per-cluster
   caches, and sends the ClusterActor one (k, top singular vector) summary per filled
   cache, i.e. one d-vector per cluster.cache_size samples. Before each batch it fetches
   the centroid rows that changed since its replica's version. Assignments leave the
   workers as ordinary Ray Data rows (sample_id, cluster, similarity, label); the driver
   collects those small rows, never a gradient. The actor saves its state every
   cluster.checkpoint_every summaries; killed, Ray restarts it from that save, the
   workers' calls are retried and their replicas fetched whole again. Summaries since the
   save are lost, samples are not: each is assigned once, by the worker that holds it.
3. Optional reassignment (cluster.reassign): mode "assign" against the frozen final
   centroids, and the share of samples whose cluster changed. The eval split is always
   assigned this way too: each held-out sample's own cluster, for evaluating experts.

The stream's order is the split's, except that rows are sorted by length within each
small block (BATCHES_PER_BLOCK batches) so that a batch pads little. With one worker,
batch size 1 and that order preserved, this is exactly the single-process
`OnlineSVDClusterer.partial_fit` over the same order; with larger batches a worker's replica
lags the central centroids by at most one batch. With grads.concurrency = W > 1 the stream
is W independent streams: worker j takes the samples whose id hashes to j and refines its
own copy of the centroids, and the actor merges the W copies in stream order when the pass
ends. Shared centroids would make the result depend on how the workers' updates interleave;
this way two runs assign every sample the same way (tests/gradientspace/test_stream.py).
"""

from __future__ import annotations

import contextlib
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from gs_ray.config import Config, config_from_dict
from gs_ray.core import storage
from gs_ray.core.errors import ConfigError, DataError
from gs_ray.data.batches import load_split, pad_batch
from gs_ray.data.prepare import end_of_turn_ids
from gs_ray.gradientspace import checks
from gs_ray.gradientspace.checks import gradient_problems
from gs_ray.gradientspace.caches import ClusterCaches
from gs_ray.gradientspace.cluster import (
    GradientFeatures,
    OnlineSVDClusterer,
    VersionToken,
    nearest_centroids,
)
from gs_ray.gradientspace.grads import PerSampleGradients, select_target_tokens
from gs_ray.modeling.models import load_adapter, load_base_model, load_tokenizer

MODES = ("gradients", "stream", "assign")
INPUT_COLUMNS = ["sample_id", "input_ids", "labels", "label"]
BATCHES_PER_BLOCK = 4
"""Rows per Ray Data block, in gradient batches: small blocks spread a split over every worker, and
rows are sorted by length within a block only, so the stream's order stays a mix of the split."""
ACTOR_MAX_RESTARTS = 3
"""A killed ClusterActor comes back this many times (its calls are retried), from its last checkpoint."""
ACTOR_CHECKPOINT = ".cluster-actor-state.npz"
"""The ClusterActor's checkpoint, in the stage's staging folder while the stage runs; removed when it is done."""


class GradientWorker:
    """Ray Data `map_batches` actor: the base model with the warm-up adapter, one per pool slot."""

    def __init__(self, config: dict[str, Any], adapter_dir: str, mode: str, actor: Any = None, stream: int = 0):
        if mode not in MODES or (mode != "gradients" and actor is None):
            raise ValueError(f"mode must be one of {MODES} (stream and assign need the actor), got {mode!r}")
        cfg = config_from_dict(config)
        device = "cuda" if cfg.grads.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        model = load_adapter(load_base_model(cfg.model), adapter_dir).to(device)
        self.gradients = PerSampleGradients(model)
        tokenizer = load_tokenizer(cfg.model)
        self.pad_id = tokenizer.pad_token_id or 0
        self.tokens, self.end_ids = cfg.grads.tokens, end_of_turn_ids(tokenizer)
        if self.tokens == "end" and not self.end_ids:
            raise ConfigError(f"grads.tokens=end: the chat template of {cfg.model.name!r} puts no end-of-turn text after "
                              "a reply; use grads.tokens=answer or all")
        self.mode, self.actor, self.cache_size, self.update = mode, actor, cfg.cluster.cache_size, cfg.cluster.update
        self.stream = stream
        self.version: VersionToken | None = None
        self.centroids: np.ndarray | None = None
        self.features: GradientFeatures | None = None
        self.caches: ClusterCaches | None = None

    def _refresh(self) -> None:
        """Bring the centroid replica up to the actor's version (only changed rows travel)."""
        version, changed, mean = ray.get(self.actor.changed_since.remote(self.version, self.stream))
        if self.centroids is None:
            self.centroids = np.stack([changed[k] for k in sorted(changed)])
            self.features = GradientFeatures(mean)
            self.caches = ClusterCaches(len(self.centroids), self.cache_size, self.centroids.shape[1], self.update)
        for k, row in changed.items():
            self.centroids[k] = row
        self.version = version

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = [select_target_tokens(row, self.tokens, self.end_ids)
                for row in batch.select(["input_ids", "labels"]).to_pylist()]
        return self.process(batch, self.gradients(pad_batch(rows, self.pad_id)).cpu().numpy())

    def process(self, batch: pa.Table, grads: np.ndarray) -> dict[str, np.ndarray]:
        """The output rows of a batch given its gradients; a row with a `problem` never reaches a cache."""
        problems = gradient_problems(grads)
        out = {"sample_id": np.asarray(batch["sample_id"].to_pylist(), dtype=object), "problem": problems}
        if self.mode == "gradients":
            return out | {"gradient": grads}
        if self.mode == "stream" or self.centroids is None:
            self._refresh()
        usable = problems == ""
        clusters = np.full(len(grads), -1, dtype=np.int64)
        similarity = np.full(len(grads), np.nan, dtype=np.float32)
        features = self.features(grads[usable])
        clusters[usable], similarity[usable] = nearest_centroids(features, self.centroids)
        if self.mode == "stream" and self.update != "none":
            summaries = self.caches.add(clusters[usable], features)
            if summaries:  # waited for, so this worker's next refresh sees its own updates
                ray.get(self.actor.apply_summaries.remote(summaries, self.stream))
        labels = batch["label"].to_pylist()
        return out | {"cluster": clusters, "similarity": similarity, "label": np.asarray(labels, dtype=object)}


def _sorted_by_length(block: pa.Table) -> pa.Table:
    """A block's rows, shortest first: its batches pad to similar lengths (on the demo mix, 28% fewer padded tokens)."""
    return block.take(pc.sort_indices(pc.list_value_length(block["input_ids"])))


def _length_sorted(rows: ray.data.Dataset, rows_per_block: int, tasks: int) -> ray.data.Dataset:
    """The rows in consecutive blocks of rows_per_block, each sorted by length (a lazy, streamed plan).

    The sort runs in zero-CPU tasks, so it never waits for a CPU the actor pool holds (one actor
    of 2 CPUs on 2 cores would otherwise deadlock); `tasks` caps them, because zero-CPU tasks are
    otherwise launched without limit, each holding a block (benchmarks/scale.py).
    """
    return rows.map_batches(_sorted_by_length, batch_size=rows_per_block, batch_format="pyarrow", num_cpus=0,
                            concurrency=tasks)


def split_rows(split: str, readers: int = 1) -> ray.data.Dataset:
    """A split's rows (INPUT_COLUMNS), file by file in name order, read where they are (path or URI) as a stream.

    At most `readers` files are read at a time: a read is fast next to the gradients of its rows, and
    zero-CPU reads would otherwise all start at once and fill the object store with the whole split.
    """
    fs, root = storage.resolve(split)
    files = [f"{root}/{name}" for name in sorted(n for n in storage.file_sizes(split) if n.endswith(".parquet"))]
    if not files:
        raise DataError(f"the split under {split} is empty: nothing to assign")
    return ray.data.read_parquet(files, filesystem=fs, columns=INPUT_COLUMNS, num_cpus=0, concurrency=readers)


def _rows_of_stream(block: pa.Table, stream: int, streams: int) -> pa.Table:
    """The block's rows that belong to one stream: a fixed share of the samples, by a stable hash of the id."""
    keep = [zlib.crc32(sample_id.encode()) % streams == stream for sample_id in block["sample_id"].to_pylist()]
    return block.filter(pa.array(keep, type=pa.bool_()))


def _worker_pool(cfg: Config, rows: ray.data.Dataset, adapter_dir: str, mode: str, actor: Any, size: int,
                 stream: int = 0) -> ray.data.Dataset:
    grads = cfg.grads
    return _length_sorted(rows, grads.batch_size * BATCHES_PER_BLOCK, size).map_batches(
        GradientWorker,
        fn_constructor_kwargs={"config": cfg.to_dict(), "adapter_dir": adapter_dir, "mode": mode, "actor": actor,
                               "stream": stream},
        batch_size=grads.batch_size, batch_format="pyarrow",
        # One batch at a time per actor, in order: its centroid replica and caches are sequential state.
        compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1, max_concurrent_calls_per_actor=1),
        num_cpus=grads.num_cpus_per_actor, num_gpus=grads.num_gpus_per_actor,
    )


def _gradient_pass(cfg: Config, rows: ray.data.Dataset, adapter_dir: str, mode: str, actor: Any = None):
    """Batches (pyarrow) of one pass of the worker pool over `rows`, in input order, streamed.

    Modes "gradients" and "assign" change no state, so a pool of grads.concurrency workers
    shares the rows however Ray schedules them. A "stream" pass with several workers gives
    each its own stream (its own share of the rows, its own centroids in the actor, merged
    at the end by `ClusterActor.finish_stream`): the assignments then do not depend on
    scheduling. Each stream reads the split and keeps its share, so the split is read
    grads.concurrency times: cheap next to the gradients.
    """
    streams = cfg.grads.concurrency if mode == "stream" else 1
    if streams == 1:
        mapped = _worker_pool(cfg, rows, adapter_dir, mode, actor, cfg.grads.concurrency)
    else:
        shares = [rows.map_batches(_rows_of_stream, fn_kwargs={"stream": j, "streams": streams},
                                   batch_format="pyarrow", num_cpus=0, concurrency=1) for j in range(streams)]
        pools = [_worker_pool(cfg, share, adapter_dir, mode, actor, 1, j) for j, share in enumerate(shares)]
        mapped = pools[0].union(*pools[1:])
    return mapped.iter_batches(batch_format="pyarrow", batch_size=None)


BLOCKS_UNDER_CAP = 8
"""With an object-store cap, blocks are cut to at most cap / BLOCKS_UNDER_CAP: a read file of any size
then streams through in pieces, so that several operators' blocks fit under the cap at once."""


@contextlib.contextmanager
def ordered_execution(object_store_mib: int = 0):
    """Keep Ray Data's output in input order (streaming results then depend on the seed only) and, if
    object_store_mib > 0, cap the object store its blocks may hold (Ray Data's own default is a share
    of the store, so the stream's footprint would grow with the store rather than stay flat)."""
    context = ray.data.DataContext.get_current()
    options = context.execution_options
    previous = options.preserve_order, options.resource_limits, context.target_max_block_size
    options.preserve_order = True
    if object_store_mib:
        options.resource_limits = options.resource_limits.copy(object_store_memory=object_store_mib * 2**20)
        context.target_max_block_size = object_store_mib * 2**20 // BLOCKS_UNDER_CAP
    try:
        yield
    finally:
        options.preserve_order, options.resource_limits, context.target_max_block_size = previous


def _validation_rows(cfg: Config, data: str) -> list[dict]:
    rows = load_split(storage.join(data, "val"))[: cfg.cluster.max_val_samples]
    needed = (cfg.cluster.k or cfg.cluster.k_min) + 1
    if len(rows) < needed:
        raise DataError(
            f"the val split has {len(rows)} samples; clustering needs at least {needed} "
            "(raise data.val_fraction or add data)"
        )
    return [{column: row[column] for column in INPUT_COLUMNS} for row in rows]


def gradients_to_file(cfg: Config, rows: list[dict], adapter_dir: str, path: str) -> tuple[list[str], np.memmap, list]:
    """Every usable row's full LoRA gradient, written into a float32 memory-mapped file (rows x d) as they arrive.

    Returns the sample ids in the file's row order (the pool sorts rows by length within
    blocks, so it is not the input order), the matrix and the (sample_id, problem) of rows left out. Rows need INPUT_COLUMNS. Rows whose
    gradient cannot be clustered stop the stage or are left out (cluster.on_bad_gradient).
    """
    matrix, ids, bad = None, [], []
    for batch in _gradient_pass(cfg, ray.data.from_arrow(pa.Table.from_pylist(rows)), adapter_dir, "gradients"):
        if not batch.num_rows:
            continue
        problems = batch["problem"].to_pylist()
        found = checks.bad_samples(batch["sample_id"].to_pylist(), problems)
        checks.enforce(found, cfg.cluster.on_bad_gradient, "the val split")
        bad.extend(found)
        usable = np.asarray(problems) == ""
        block = np.stack(batch["gradient"].to_numpy(zero_copy_only=False))[usable]
        if matrix is None:  # d is known once the first gradients arrive
            matrix = np.memmap(path, dtype=np.float32, mode="w+", shape=(len(rows), block.shape[1]))
        matrix[len(ids) : len(ids) + len(block)] = block
        ids.extend(np.asarray(batch["sample_id"].to_pylist(), dtype=object)[usable].tolist())
    if matrix is None or not ids:
        raise DataError("no gradients were computed: the rows are empty" if matrix is None else
                        f"every one of the {len(bad)} validation gradients was left out: nothing to cluster")
    return ids, matrix[: len(ids)], bad


def fit_on_validation(cfg: Config, data: str, adapter_dir: str, scratch: Path) -> tuple[OnlineSVDClusterer, dict]:
    """K and initial centroids from the validation gradients, held in a memory-mapped file only."""
    rows = _validation_rows(cfg, data)
    clusterer = OnlineSVDClusterer(cfg.cluster, seed=cfg.run.seed)
    with tempfile.NamedTemporaryFile(dir=scratch, prefix=".val-gradients-", suffix=".f32") as handle:
        ids, matrix, bad = gradients_to_file(cfg, rows, adapter_dir, handle.name)
        fit = clusterer.fit_validation(matrix)
        del matrix
    fit["val_samples"], fit["bad"] = len(ids), bad
    return clusterer, fit


def assign_split(cfg: Config, split: str, adapter_dir: str, actor: Any, mode: str) -> tuple[pa.Table, list]:
    """(sample_id, cluster, similarity, label of every usable sample of a split, sorted by sample_id; the
    (sample_id, problem) of those left out under cluster.on_bad_gradient=skip). Under `error`, the first
    batch with an unusable gradient stops the pass."""
    tables, bad = [], []
    for batch in _gradient_pass(cfg, split_rows(split, cfg.grads.concurrency), adapter_dir, mode, actor):
        if not batch.num_rows:
            continue
        found = checks.bad_samples(batch["sample_id"].to_pylist(), batch["problem"].to_pylist())
        checks.enforce(found, cfg.cluster.on_bad_gradient, f"the split under {split}")
        bad.extend(found)
        tables.append(batch.filter(pc.equal(batch["problem"], "")).drop_columns(["problem"]))
    if not tables:
        raise DataError(f"the split under {split} is empty: nothing to assign")
    return pa.concat_tables(tables).sort_by("sample_id"), bad
