"""The EAM collection (EAMC): a bounded set of finished requests' activation patterns, matched against live ones.

Members are stored row-normalised (each layer's row is a distribution over experts), with unit-length copies
flattened to ``[capacity, layers * experts]``, so matching a batch of queries against the whole collection is one
matrix product: the cosine similarity of every layer row, averaged over the rows the query has observed.

When the collection is full, a new EAM goes to its nearest member: merged into it when they are near-duplicates,
replacing it otherwise. Either way the rest of the collection (the other patterns) is untouched, so it stays
diverse and never grows past ``--eamc-capacity``. It is saved atomically under the state directory and reloaded
at start, so a restarted memd predicts from the first request on; a file that fails its checksum is ignored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from common.access import OWNER_ONLY, Access

log = logging.getLogger("moeinf.memd.eamc")
FORMAT = "moeinf-eamc/1"
FILE_NAME = "eamc.bin"
MERGE_SIMILARITY = 0.95  # at or above: the new EAM is a near-duplicate and is averaged into its nearest member
MAX_MERGED = 16  # a merged member keeps adapting: a newcomer weighs at least 1/16


class EamcFileError(ValueError):
    """The EAMC file is unreadable, corrupt or for another model."""


def normalise_rows(eam: np.ndarray, order: int = 1) -> np.ndarray:
    """Each row divided by its L1 (``order=1``) or L2 (``order=2``) norm; all-zero rows stay zero."""
    eam = np.asarray(eam, dtype=np.float32)
    norm = np.abs(eam).sum(-1, keepdims=True) if order == 1 else np.sqrt((eam * eam).sum(-1, keepdims=True))
    return np.divide(eam, norm, out=np.zeros_like(eam), where=norm > 0)


class Eamc:
    def __init__(self, num_layers: int, num_experts: int, capacity: int, model: str = ""):
        self.num_layers, self.num_experts, self.capacity, self.model = num_layers, num_experts, capacity, model
        self.prob = np.zeros((capacity, num_layers, num_experts), np.float32)
        self.unit = np.zeros((capacity, num_layers * num_experts), np.float32)
        self.weight = np.zeros(capacity, np.float32)  # EAMs merged into each member
        self.hits = np.zeros(capacity, np.int64)  # times each member was among the top matches
        self.size = 0
        self.inserted = self.merged = self.replaced = 0
        self.dirty = False

    def __len__(self) -> int:
        return self.size

    # ---------------------------------------------------------------- matching
    def similarity(self, queries: np.ndarray) -> np.ndarray:
        """``[R, L, E]`` EAMs (counts) -> ``[R, size]`` mean per-row cosine over each query's non-empty rows."""
        unit = normalise_rows(queries, order=2)
        observed = (unit != 0).any(-1)  # [R, L]
        rows = np.maximum(observed.sum(-1), 1).astype(np.float32)  # [R]
        flat = unit.reshape(len(queries), -1)
        return (flat @ self.unit[:self.size].T) / rows[:, None]

    def predict(self, queries: np.ndarray, top: int, *, count: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """For each query, the similarity-weighted average of its ``top`` nearest members: ``([R, L, E]`` row
        distributions, ``[R]`` best similarity, in [0, 1]). All zeros while the collection is empty. ``count=False``:
        a look (the admin's) that does not count as a match."""
        n = len(queries)
        if self.size == 0 or n == 0:
            return np.zeros((n, self.num_layers, self.num_experts), np.float32), np.zeros(n, np.float32)
        sims = self.similarity(queries)
        top = min(top, self.size)
        best = np.argpartition(-sims, top - 1, axis=1)[:, :top]  # [R, top]
        weights = np.clip(np.take_along_axis(sims, best, axis=1), 0.0, None)
        total = weights.sum(1, keepdims=True)
        weights = np.divide(weights, total, out=np.full_like(weights, 1.0 / top), where=total > 0)
        if count:
            np.add.at(self.hits, best.ravel(), 1)
        predicted = np.einsum("rt,rtle->rle", weights, self.prob[best])
        return predicted, np.clip(np.nan_to_num(sims.max(1)), 0.0, 1.0)  # (float32 rounding passes 1 by an ulp)

    # ---------------------------------------------------------------- insertion
    def add(self, eam: np.ndarray) -> int | None:
        """Insert a finished request's EAM (counts); returns the member index it went to (None if it was empty)."""
        prob = normalise_rows(eam)
        if not prob.any():
            return None
        self.dirty = True
        self.inserted += 1
        if self.size < self.capacity:
            index = self.size
            self.size += 1
            self._set(index, prob, 1.0)
            return index
        sims = self.similarity(eam[None])[0]
        index = int(np.argmax(sims))
        if sims[index] >= MERGE_SIMILARITY:
            w = float(self.weight[index])
            self._set(index, (self.prob[index] * w + prob) / (w + 1), min(w + 1, MAX_MERGED))
            self.merged += 1
        else:
            self._set(index, prob, 1.0)
            self.hits[index] = 0
            self.replaced += 1
        return index

    def _set(self, index: int, prob: np.ndarray, weight: float) -> None:
        self.prob[index] = prob
        self.unit[index] = normalise_rows(prob, order=2).ravel()
        self.weight[index] = weight

    def clear(self) -> None:
        """Forget every member (the admin's ``eamc clear``)."""
        self.prob[:self.size] = 0
        self.unit[:self.size] = 0
        self.weight[:self.size] = 0
        self.hits[:self.size] = 0
        self.size = 0
        self.dirty = True

    def copy(self) -> Eamc:
        """A snapshot to save or load off the event loop; ``assign`` takes a loaded one back."""
        other = Eamc(self.num_layers, self.num_experts, self.capacity, self.model)
        other.assign(self)
        return other

    def assign(self, other: Eamc) -> None:
        self.clear()
        n = other.size
        self.prob[:n], self.unit[:n], self.weight[:n], self.hits[:n] = (
            other.prob[:n], other.unit[:n], other.weight[:n], other.hits[:n])
        self.size = n
        self.dirty = True

    # ---------------------------------------------------------------- persistence
    def save(self, path: Path, access: Access = OWNER_ONLY) -> None:
        """Write atomically: a temporary file in the same directory (0600, or 0660 with a group, whatever the
        umask), fsync, then rename over ``path``. The temporary file is this thread's own: an admin save and the
        periodic one may run at once, and each must rename a whole file."""
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        with os.fdopen(access.create(tmp), "wb") as f:
            f.write(self.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.dirty = False

    def to_bytes(self) -> bytes:
        """The file's content: a JSON header line, then the members' rows, weights and match counts."""
        n = self.size
        payload = self.prob[:n].tobytes() + self.weight[:n].tobytes() + self.hits[:n].tobytes()
        header = {"format": FORMAT, "model": self.model, "num_layers": self.num_layers,
                  "num_experts": self.num_experts, "size": n, "sha256": hashlib.sha256(payload).hexdigest()}
        return json.dumps(header).encode() + b"\n" + payload

    def load(self, path: Path) -> None:
        """Replace the members with those saved in ``path``; raises EamcFileError (and keeps none) if it is bad."""
        try:
            with open(path, "rb") as f:
                if not os.path.isfile(path):
                    raise EamcFileError(f"{path}: not a regular file")
                head = f.read(65536)  # the header line: what follows must be exactly its members' bytes
                end = head.find(b"\n")
                try:
                    n = json.loads(head[:end]).get("size") if end > 0 else None
                except (ValueError, AttributeError):
                    n = None
                whole = end + 1 + n * (self.num_layers * self.num_experts * 4 + 12) if isinstance(n, int) else -1
                if n is None or os.fstat(f.fileno()).st_size != whole:
                    raise EamcFileError(f"{path}: not an EAMC file ({FORMAT}), or truncated")  # (read no further)
                raw = head + f.read()
        except OSError as exc:
            raise EamcFileError(f"{path}: {exc.strerror}") from None
        self.from_bytes(raw, str(path))
        self.dirty = False

    def from_bytes(self, raw: bytes, path: str) -> None:
        """Replace the members with those in ``raw`` (``to_bytes``' format; ``path`` names it in errors)."""
        end = raw.find(b"\n", 0, 65536)
        try:
            header = json.loads(raw[:end]) if end > 0 else None
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise EamcFileError(f"{path}: not an EAMC file ({FORMAT})")
        dims = (header.get("num_layers"), header.get("num_experts"))
        if dims != (self.num_layers, self.num_experts) or (self.model and header.get("model") != self.model):
            raise EamcFileError(f"{path}: saved for {header.get('model')!r} with {dims[0]} MoE layers x {dims[1]}"
                                f" experts, memd serves {self.model!r} with {self.num_layers} x {self.num_experts}")
        payload = raw[end + 1:]
        n = header.get("size")
        cells = self.num_layers * self.num_experts
        if not isinstance(n, int) or n < 0 or len(payload) != n * (cells * 4 + 4 + 8):
            raise EamcFileError(f"{path}: truncated ({len(payload)} payload bytes for {n} members)")
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise EamcFileError(f"{path}: checksum mismatch (corrupt)")
        prob = np.frombuffer(payload, np.float32, n * cells).reshape(n, self.num_layers, self.num_experts)
        weight = np.frombuffer(payload, np.float32, n, offset=n * cells * 4)
        hits = np.frombuffer(payload, np.int64, n, offset=n * (cells * 4 + 4))
        if problem := _bad_members(prob, weight, hits):
            raise EamcFileError(f"{path}: {problem}")
        keep = np.argsort(-hits, kind="stable")[:self.capacity]  # a smaller --eamc-capacity keeps the most matched
        self.size = 0
        for i in keep:
            self._set(self.size, prob[i], float(weight[i]))
            self.hits[self.size] = hits[i]
            self.size += 1
        self.dirty = True

    def merge(self, other: Eamc) -> tuple[int, int]:
        """Take in a peer's members (a replica starting cold learns what its fleet saw). Ours stay: they describe
        this replica's own traffic. A peer member that is a near-duplicate of one of ours is averaged into it;
        the others fill the free capacity, the peer's most matched first; what does not fit is left out.
        Returns (merged, added)."""
        merged = added = 0
        for i in np.argsort(-other.hits[:other.size], kind="stable"):
            prob, weight = other.prob[i], float(other.weight[i])
            sims = self.similarity(prob[None])[0] if self.size else np.zeros(0)
            if sims.size and sims.max() >= MERGE_SIMILARITY:
                j, w = int(np.argmax(sims)), float(self.weight[int(np.argmax(sims))])
                self._set(j, (self.prob[j] * w + prob * weight) / (w + weight), min(w + weight, MAX_MERGED))
                merged += 1
            elif self.size < self.capacity:
                self._set(self.size, prob, weight)
                self.hits[self.size] = other.hits[i]
                self.size += 1
                added += 1
        self.dirty = self.dirty or bool(merged or added)
        return merged, added


def load_or_empty(path: Path, num_layers: int, num_experts: int, capacity: int, model: str) -> Eamc:
    """The EAMC saved at ``path``, or an empty one. A file that is there but unusable (corrupt, truncated, for
    another model) is renamed ``<name>.corrupt-<UTC time>`` first, so the next save cannot overwrite it."""
    eamc = Eamc(num_layers, num_experts, capacity, model)
    if path.exists():
        try:
            eamc.load(path)
            log.info("EAMC: %d activation patterns loaded from %s", eamc.size, path)
        except EamcFileError as exc:
            kept = _corrupt_name(path)
            try:
                os.replace(path, kept)
            except OSError as err:
                kept = f"nowhere ({err.strerror}): it will be overwritten"
            log.warning("ignoring the EAMC file, starting with an empty collection (the file is kept as %s): %s",
                        kept, exc)
    return eamc


def _corrupt_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while kept.exists():  # two in one second: never replace an earlier copy
        kept, n = path.with_name(f"{path.name}.corrupt-{stamp}-{n}"), n + 1
    return kept


def _bad_members(prob: np.ndarray, weight: np.ndarray, hits: np.ndarray) -> str:
    """What makes saved members unusable ("" if nothing): rows finite, >= 0, summing to at most 1 (1 or 0 for a
    request's own; a merge with a request that missed a layer leaves less), weights in [1, MAX_MERGED], match counts
    >= 0 (a checksum says the bytes are whole, not that they are an EAMC's: a file or a peer could hold NaN rows that
    would poison every prediction)."""
    if not np.isfinite(prob).all() or (prob < 0).any() or (prob.sum(-1) > 1 + 1e-3).any():
        return "a member's rows are not distributions (finite, non-negative, summing to at most 1)"
    if not (np.isfinite(weight) & (weight >= 1) & (weight <= MAX_MERGED)).all():
        return f"a member's weight is outside [1, {MAX_MERGED}]"
    if (hits < 0).any():
        return "a member's match count is negative"
    return ""
