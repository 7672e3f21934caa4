"""The "embed" stage: teacher embeddings of every unlabeled image, files per shard (their layout,
skipping, resuming, job arrays: slade_dist/pseudo/README.md). Each rank embeds its own shards
(dist.shard_slice); `shard_ids` is one array task's subset.
Tests: tests/unit/test_embed.py, tests/integration/test_pseudo_multirank.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from ..config import Config
from ..data.readers import finite_batches
from ..data.shards import read_index, shard_index, shard_paths
from ..errors import UnusableInput
from ..fileio import atomic_path, atomic_write_json, atomic_write_text
from ..models import embed_batches, load_embedder, output_dim, read_checkpoint
from ..progress import progress
from ..stages import RunLayout

FACTS_FILE = "embed.json"


# ----------------------------------------------------------------------------- file layout
def emb_path(emb_dir: str | os.PathLike[str], shard: str | os.PathLike[str] | int) -> Path:
    i = shard if isinstance(shard, int) else shard_index(shard)
    return Path(emb_dir) / f"emb-{i:06d}.npy"


def keys_path(emb_dir: str | os.PathLike[str], shard: str | os.PathLike[str] | int) -> Path:
    return emb_path(emb_dir, shard).with_suffix(".keys")


def labels_path(emb_dir: str | os.PathLike[str], shard: str | os.PathLike[str] | int) -> Path:
    return emb_path(emb_dir, shard).with_suffix(".labels.npy")


def source_path(emb_dir: str | os.PathLike[str], shard: str | os.PathLike[str] | int) -> Path:
    return emb_path(emb_dir, shard).with_suffix(".src")


def _source_stamp(shard: Path) -> str:
    st = shard.stat()
    return f"{shard.name}:{st.st_size}:{st.st_mtime_ns}\n"


def is_embedded(emb_dir: str | os.PathLike[str], shard: str | os.PathLike[str] | int) -> bool:
    """The .npy is renamed into place last, so its presence means the shard is complete; given the
    tar's path, the tar must also be the one embedded (a restored or rewritten shard is redone)."""
    if not (emb_path(emb_dir, shard).exists() and keys_path(emb_dir, shard).exists()):
        return False
    if isinstance(shard, int):
        return True
    src = source_path(emb_dir, shard)
    return src.exists() and src.read_text() == _source_stamp(Path(shard))


def load_embeddings(emb_dir: str | os.PathLike[str], shard: str | os.PathLike[str] | int) -> np.ndarray:
    """Memory-mapped (n, d) float16 embeddings of one shard (nothing is read until used)."""
    return np.load(emb_path(emb_dir, shard), mmap_mode="r")


def read_keys(emb_dir: str | os.PathLike[str], shard: str | os.PathLike[str] | int) -> list[str]:
    text = keys_path(emb_dir, shard).read_text()
    return text.split("\n")[:-1] if text else []


def read_hidden_labels(emb_dir: str | os.PathLike[str], shard: str | os.PathLike[str] | int) -> np.ndarray | None:
    p = labels_path(emb_dir, shard)
    return np.load(p, allow_pickle=False) if p.exists() else None


def read_embed_facts(emb_dir: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        return json.loads((Path(emb_dir) / FACTS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# ------------------------------------------------------------------------------------ stage
def run(cfg: Config, run_dir: Path, shard_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Embed this round's unlabeled shards (all, or only `shard_ids`) not yet embedded by this
    teacher; every rank calls it. Returns counts for DONE.json."""
    t0 = time.time()
    log = dist.get_logger()
    r = cfg.run.round
    layout = RunLayout(run_dir)
    out_dir = layout.stage_dir("embed", r)
    weights = layout.teacher_weights(r)
    if not weights.exists():
        raise FileNotFoundError(
            f"embed round {r}: teacher weights {weights} are missing (train the "
            f"{'teacher' if r <= 1 else f'round {r - 1} student'} first)"
        )
    shards = _select(_unlabeled_shards(cfg), shard_ids)
    facts = _teacher_facts(weights, cfg) if dist.is_main() else None
    facts = dist.broadcast_object(facts)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        _drop_other_teachers_outputs(out_dir, facts)
    dist.barrier()

    todo = [p for p in dist.shard_slice(shards) if not is_embedded(out_dir, p)]
    device = dist.device()
    model = load_embedder(weights, map_location="cpu").to(device).eval() if todo else None
    counts = {
        "written": 0,
        "images": 0,
        "skipped_corrupt": 0,
        "lost_to_truncation": 0,
        "already_done": len(dist.shard_slice(shards)) - len(todo),
    }
    # one DataLoader per group of num_workers shards: each worker decodes one shard in parallel
    group = max(1, cfg.data.num_workers)
    bar = _progress(todo, cfg)
    for g in range(0, len(todo), group):
        n, left_out = _embed_group(model, todo[g : g + group], out_dir, cfg, device, bar)
        counts["written"] += len(todo[g : g + group])
        counts["images"] += n
        counts["skipped_corrupt"] += left_out["corrupt"]
        counts["lost_to_truncation"] += left_out["lost"]
    if bar is not None:
        bar.close()
    total = torch.tensor([counts[k] for k in sorted(counts)], dtype=torch.float64)
    total = dist.staged_all_reduce_sum(total)
    result = {k: int(v) for k, v in zip(sorted(counts), total.tolist())}
    seconds = time.time() - t0
    result.update(
        shards=len(shards),
        seconds=round(seconds, 2),
        images_per_s=round(result["images"] / seconds, 1) if seconds > 0 else 0.0,
        data={
            "images_read": result["images"],
            "skipped_corrupt": result["skipped_corrupt"],
            "lost_to_truncation": result["lost_to_truncation"],
        },
    )
    if dist.is_main():
        atomic_write_json(out_dir / FACTS_FILE, {**facts, "dim": _dim(out_dir, shards)})
    dist.barrier()
    log.info(
        f"[embed] round {r}: {result['written']} shards written: {result['images']} images read, "
        f"{result['skipped_corrupt']} skipped as corrupt, {result['lost_to_truncation']} lost to truncated "
        f"tars; {result['already_done']} shards already done"
    )
    if result["written"] and not result["images"]:
        raise UnusableInput(
            f"embed round {r}: not one of the {result['skipped_corrupt'] + result['lost_to_truncation']} "
            f"images of {result['written']} shards in {cfg.data.unlabeled_shards} could be read "
            f"(corrupt or truncated data); nothing to cluster"
        )
    return result


def _unlabeled_shards(cfg: Config) -> list[Path]:
    if not cfg.data.unlabeled_shards:
        raise ValueError("data.unlabeled_shards must be set for the embed stage")
    return shard_paths(cfg.data.unlabeled_shards)


def _select(shards: list[Path], shard_ids: Sequence[int] | None) -> list[Path]:
    if shard_ids is None:
        return shards
    by_id = {shard_index(p): p for p in shards}
    unknown = sorted(set(shard_ids) - set(by_id))
    if unknown:
        raise ValueError(
            f"embed: shard ids {unknown[:10]} are not in the unlabeled index (valid: {min(by_id)}..{max(by_id)})"
        )
    return [by_id[i] for i in sorted(set(shard_ids))]


def _teacher_facts(weights: Path, cfg: Config) -> dict[str, Any]:
    """What identifies these embeddings: the teacher file's content hash, its step and the
    image geometry (a changed crop size changes every embedding)."""
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    step = None
    try:
        extra = read_checkpoint(weights, "cpu").get("extra", {}) or {}
        step = extra.get("step", extra.get("global_step"))
    except Exception:  # the step is informative only; load_embedder reports real problems
        step = None
    return {
        "teacher_weights": str(weights),
        "teacher_sha256": h.hexdigest(),
        "teacher_step": int(step) if step is not None else None,
        "image_size": cfg.data.image_size,
        "resize_size": cfg.data.resize_size,
    }


def _drop_other_teachers_outputs(out_dir: Path, facts: dict[str, Any]) -> None:
    old = read_embed_facts(out_dir)
    same = all(old.get(k) == facts.get(k) for k in ("teacher_sha256", "image_size", "resize_size"))
    if old and not same:
        dist.get_logger().warning(
            f"[embed] {out_dir} holds embeddings of another teacher/geometry: removing them and embedding again"
        )
        for p in list(out_dir.glob("emb-*")):
            p.unlink()
        (out_dir / FACTS_FILE).unlink()
    if not (out_dir / FACTS_FILE).exists():
        atomic_write_json(out_dir / FACTS_FILE, facts)  # claim the dir before any shard is written


def _embed_group(
    model: torch.nn.Module, shards: list[Path], out_dir: Path, cfg: Config, device: torch.device, bar: Any
) -> tuple[int, int]:
    """Embed a few shards in one finite pass (samples routed back to their shard by file name,
    in shard order) and write each shard's files atomically. Returns (images, {"corrupt", "lost"})."""
    rows: dict[str, dict[str, list]] = {p.name: {"keys": [], "embs": [], "hidden": []} for p in shards}
    stream = finite_batches(list(shards), cfg.data, cfg.pseudo.embed_batch_size, rank=0, world=1)
    for e, batch in embed_batches(model, stream, device):
        e16 = e.astype(np.float16)
        for j, (name, key, meta) in enumerate(zip(batch["shards"], batch["keys"], batch["meta"])):
            r = rows[name]
            r["keys"].append(str(key))
            r["embs"].append(e16[j])
            r["hidden"].append(_hidden_label(meta))
        if bar is not None:
            bar.update(len(e))
    dim = output_dim(model)
    n = 0
    for p in shards:
        r = rows[p.name]
        arr = np.stack(r["embs"]) if r["embs"] else np.zeros((0, dim), np.float16)
        _write_shard_files(out_dir, p, arr, r["keys"], r["hidden"])
        n += len(r["keys"])
    return n, stream.counts


def _hidden_label(meta: Any) -> str | None:
    """The true class an unlabeled sample's json may carry (never trained on; purity only)."""
    if isinstance(meta, (bytes, str)):
        try:
            meta = json.loads(meta)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    if isinstance(meta, dict) and meta.get("label") is not None:
        return str(meta["label"])
    return None


def _write_shard_files(out_dir: Path, shard: Path, arr: np.ndarray, keys: list[str], hidden: list[str | None]) -> None:
    """keys, labels and source stamp first, the .npy last: is_embedded() is true only once all are
    complete."""
    if len(keys) != len(arr) or len(set(keys)) != len(keys):
        raise RuntimeError(
            f"embed {shard.name}: {len(keys)} keys ({len(set(keys))} distinct) for {len(arr)} embeddings"
        )
    kp = keys_path(out_dir, shard)
    atomic_write_text(kp, "".join(k + "\n" for k in keys))
    atomic_write_text(source_path(out_dir, shard), _source_stamp(shard))
    lp = labels_path(out_dir, shard)
    if any(h is not None for h in hidden):
        with atomic_path(lp) as tmp:
            np.save(tmp, np.array([h if h is not None else "" for h in hidden], dtype=str))
    else:
        lp.unlink(missing_ok=True)
    with atomic_path(emb_path(out_dir, shard)) as tmp:
        np.save(tmp, np.ascontiguousarray(arr, dtype=np.float16))


def _dim(out_dir: Path, shards: Iterable[Path]) -> int | None:
    for p in shards:
        if is_embedded(out_dir, p):
            return int(load_embeddings(out_dir, p).shape[1])
    return None


def _progress(todo: list[Path], cfg: Config) -> Any:
    """Rank-0 bar in images (index.json counts of this rank's shards), with images/s. Index names
    are paths relative to the index's directory: img2dataset output indexed in place lists
    "../<out>/00000.tar", so shards are matched by resolved path, not by file name."""
    if not dist.is_main() or not todo:
        return None
    root = Path(cfg.data.unlabeled_shards)
    counts = {(root / s["name"]).resolve(): int(s["count"]) for s in read_index(root)["shards"]}
    total = sum(counts.get(p.resolve(), 0) for p in todo)
    return progress(total or None, f"embed {len(todo)} shards (rank 0)", "img", unit_scale=True)
