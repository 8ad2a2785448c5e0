"""The EAMC: matching on observed rows picks the right member, a full collection stays bounded and diverse, and
the file round-trips (a corrupt or foreign file is ignored with a warning)."""
import logging

import numpy as np
import pytest

from services.memd.eamc import Eamc, EamcFileError, load_or_empty, normalise_rows

L, E = 4, 8


def pattern(experts_per_layer, tokens=10) -> np.ndarray:
    """An EAM whose layer l routes ``tokens`` to each expert of ``experts_per_layer[l]``."""
    eam = np.zeros((L, E), np.float32)
    for layer, experts in enumerate(experts_per_layer):
        eam[layer, experts] = tokens
    return eam


TOPICS = {  # three clearly different activation patterns
    "a": pattern([[0, 1], [2, 3], [4, 5], [6, 7]]),
    "b": pattern([[2, 3], [4, 5], [6, 7], [0, 1]]),
    "c": pattern([[4, 5], [6, 7], [0, 1], [2, 3]]),
}


def collection(capacity=8) -> Eamc:
    eamc = Eamc(L, E, capacity, model="tiny")
    for eam in TOPICS.values():
        eamc.add(eam)
    return eamc


def test_match_on_observed_layers_picks_the_right_member():
    eamc = collection()
    # a request that has run only layers 0 and 1, like topic b, with some noise on layer 1
    query = np.zeros((L, E), np.float32)
    query[0, [2, 3]] = [5, 4]
    query[1, [4, 5, 0]] = [3, 3, 1]
    sims = eamc.similarity(query[None])[0]
    assert int(np.argmax(sims)) == 1
    assert sims[1] > 0.9 and sims[0] < 0.2 and sims[2] < 0.2  # unobserved rows do not dilute the score
    predicted, best = eamc.predict(query[None], top=1)
    assert np.allclose(predicted[0], normalise_rows(TOPICS["b"]))  # rows 2 and 3 are b's
    assert best[0] == pytest.approx(sims[1])
    assert eamc.hits.tolist()[:3] == [0, 1, 0]


def test_top_matches_are_weighted_by_similarity_and_one_product_serves_a_batch():
    eamc = collection()
    queries = np.stack([TOPICS["a"], TOPICS["c"], 0.5 * TOPICS["a"] + 0.5 * TOPICS["b"]])
    sims = eamc.similarity(queries)
    assert sims.shape == (3, 3)
    assert np.argmax(sims, 1).tolist()[:2] == [0, 2]
    predicted, _ = eamc.predict(queries, top=2)
    # the mixed query sits between a and b: its prediction weighs both, equally
    assert np.allclose(predicted[2], 0.5 * normalise_rows(TOPICS["a"]) + 0.5 * normalise_rows(TOPICS["b"]))
    assert np.allclose(predicted.sum(-1), 1.0)  # every row is a distribution


def test_empty_collection_and_empty_rows_predict_nothing():
    eamc = Eamc(L, E, 4)
    predicted, best = eamc.predict(TOPICS["a"][None], top=3)
    assert not predicted.any() and best.tolist() == [0.0]
    assert eamc.add(np.zeros((L, E))) is None and len(eamc) == 0
    eamc.add(TOPICS["a"])
    sims = eamc.similarity(np.zeros((1, L, E)))
    assert sims.tolist() == [[0.0]]  # no NaN from all-zero rows


def test_full_collection_merges_near_duplicates_and_replaces_the_nearest():
    eamc = collection(capacity=3)
    assert len(eamc) == 3
    # a near-duplicate of a is averaged into a's member; b and c are untouched
    near_a = TOPICS["a"].copy()
    near_a[3, 6] += 1
    assert eamc.add(near_a) == 0
    assert eamc.merged == 1 and eamc.weight[0] == 2 and len(eamc) == 3
    assert np.allclose(eamc.prob[1], normalise_rows(TOPICS["b"]))
    assert np.allclose(eamc.prob[2], normalise_rows(TOPICS["c"]))
    # a new pattern closest to c (3 rows of 4 shared) replaces c, not a or b: the collection stays diverse
    new = pattern([[4, 5], [6, 7], [0, 1], [5, 6]])
    assert eamc.add(new) == 2
    assert eamc.replaced == 1 and len(eamc) == 3
    assert np.allclose(eamc.prob[2], normalise_rows(new))
    assert np.allclose(eamc.prob[1], normalise_rows(TOPICS["b"]))
    for _ in range(50):  # the bound holds whatever comes
        eamc.add(np.random.default_rng(_).integers(0, 3, (L, E)).astype(np.float32))
    assert len(eamc) == 3 and eamc.inserted == 3 + 2 + 50


def test_persistence_round_trips(tmp_path):
    eamc = collection()
    eamc.predict(TOPICS["b"][None], top=1)
    path = tmp_path / "eamc.bin"
    eamc.save(path)
    assert not eamc.dirty and not list(tmp_path.glob("*.tmp-*"))  # atomic: no temporary left behind
    again = load_or_empty(path, L, E, 8, "tiny")
    assert len(again) == 3
    order = [1, 0, 2]  # reloaded most matched first (b was matched once)
    assert np.array_equal(again.prob[:3], eamc.prob[order]) and np.array_equal(again.unit[:3], eamc.unit[order])
    assert again.hits[:3].tolist() == [1, 0, 0] and again.weight[:3].tolist() == [1, 1, 1]
    # a smaller capacity keeps the most matched members
    small = load_or_empty(path, L, E, 1, "tiny")
    assert len(small) == 1 and np.array_equal(small.prob[0], eamc.prob[1])


@pytest.mark.parametrize("damage, words", [
    (lambda raw: raw[:-7], "truncated"),
    (lambda raw: raw[:-5] + bytes(b ^ 0xFF for b in raw[-5:]), "checksum"),
    (lambda raw: b"garbage\n" + raw, "not an EAMC file"),
    (lambda raw: b"", "not an EAMC file"),
])
def test_corrupt_file_is_detected_and_ignored_with_a_warning(tmp_path, caplog, damage, words):
    path = tmp_path / "eamc.bin"
    collection().save(path)
    damaged = damage(path.read_bytes())
    path.write_bytes(damaged)
    with pytest.raises(EamcFileError, match=words):
        Eamc(L, E, 8, "tiny").load(path)
    with caplog.at_level(logging.WARNING):
        eamc = load_or_empty(path, L, E, 8, "tiny")
    assert len(eamc) == 0
    assert "ignoring the EAMC file" in caplog.text and words in caplog.text
    # the bad file is kept aside (a later save must not destroy what may be worth a look), not overwritten
    (kept,) = tmp_path.glob("eamc.bin.corrupt-*")
    assert not path.exists() and kept.read_bytes() == damaged and kept.name in caplog.text
    collection().save(path)
    path.write_bytes(damaged)
    load_or_empty(path, L, E, 8, "tiny")
    assert len(list(tmp_path.glob("eamc.bin.corrupt-*"))) == 2  # a second one in the same second: both kept


def test_file_of_another_model_is_ignored(tmp_path, caplog):
    path = tmp_path / "eamc.bin"
    collection().save(path)
    assert len(load_or_empty(path, L, E + 1, 8, "tiny")) == 0
    collection().save(path)
    assert len(load_or_empty(path, L, E, 8, "other")) == 0
    assert caplog.text.count("ignoring the EAMC file") == 2 and "8 experts" in caplog.text


def test_the_periodic_save_runs_off_memds_event_loop(tmp_path, monkeypatch):
    """A large model's EAMC takes a fraction of a second to build, hash and fsync; saved on the loop, every acquire
    waited for it. The periodic save writes a snapshot on a thread; a failed save leaves the EAMC dirty; a save in
    flight when memd stops is waited for."""
    import asyncio
    import time
    from types import SimpleNamespace

    from services.memd import server as memd_server

    saved = []

    def slow_save(self, path, access):
        time.sleep(0.3)
        if saved and saved[-1] == "fail":
            raise OSError(28, "No space left on device")
        path.write_bytes(self.to_bytes())
        saved.append(self.size)
    monkeypatch.setattr(Eamc, "save", slow_save)
    monkeypatch.setattr(memd_server, "EAMC_SAVE_INTERVAL_S", 0.01)
    srv = memd_server.MemdServer.__new__(memd_server.MemdServer)
    srv.core, srv.cfg, srv.eamc_path = SimpleNamespace(eamc=collection()), SimpleNamespace(group=""), tmp_path / "e"
    srv.core.eamc.dirty = True

    async def lag_while_saving() -> float:
        saver, worst = asyncio.create_task(srv._save_eamc_now_and_then()), 0.0
        for _ in range(40):  # 0.4 s of 10 ms ticks: the save runs meanwhile
            start = time.perf_counter()
            await asyncio.sleep(0.01)
            worst = max(worst, time.perf_counter() - start)
        saver.cancel()
        await asyncio.gather(saver, return_exceptions=True)
        return worst
    assert asyncio.run(lag_while_saving()) < 0.15
    assert saved == [3] and srv.eamc_path.exists() and not srv.core.eamc.dirty
    saved.append("fail")
    srv.core.eamc.dirty = True
    asyncio.run(lag_while_saving())
    assert srv.core.eamc.dirty  # not saved: tried again later, or by the final save


@pytest.mark.parametrize("poison, words", [
    (lambda e: e.prob.__setitem__((0, 0, 0), np.nan), "not distributions"),
    (lambda e: e.prob.__setitem__((0, 0, slice(None)), 0.5), "not distributions"),
    (lambda e: e.prob.__setitem__((0, 0, 0), -0.1), "not distributions"),
    (lambda e: e.weight.__setitem__(0, 0.0), "weight is outside"),
    (lambda e: e.hits.__setitem__(0, -2**62), "match count is negative"),
])
def test_a_whole_file_with_unusable_members_is_refused(tmp_path, poison, words):
    """The checksum says the bytes are whole, not that they are an EAMC's: NaN rows, zero weights or negative
    counts (a hand-made file, a peer's bug) would poison every prediction or divide by zero."""
    eamc = collection()
    poison(eamc)
    path = tmp_path / "eamc.bin"
    eamc.save(path)
    with pytest.raises(EamcFileError, match=words):
        Eamc(L, E, 8, "tiny").load(path)


def test_a_file_larger_than_any_eamc_is_not_read(tmp_path):
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # (sparse: a slot-image cache's experts.bin looks like this)
    with pytest.raises(EamcFileError, match="not an EAMC file"):
        Eamc(L, E, 8, "tiny").load(path)


def test_memd_reloads_what_it_saved_at_a_real_size_and_a_smaller_capacity(tmp_path):
    """A file of a larger --eamc-capacity (a restart with a smaller one keeps the most matched), and members merged
    with a request that missed a layer (a row summing to less than 1), are memd's own: loaded, not refused."""
    layers, experts = 24, 64
    eamc = Eamc(layers, experts, 200, "big")
    rng = np.random.default_rng(0)
    for _ in range(199):
        eamc.add(rng.random((layers, experts)).astype(np.float32) * (rng.random((layers, experts)) < 0.1))
    full = rng.random((layers, experts)).astype(np.float32)
    eamc.add(full)  # (the 200th: the collection is full, so the next one merges)
    partial = full.copy()
    partial[-1] = 0  # the same request pattern without its last layer: merged into the member above
    eamc.add(partial)
    sums = eamc.prob[:eamc.size].sum(-1)
    assert ((sums > 0.01) & (sums < 0.99)).any()  # (a row the merge left summing to less than 1)
    path = tmp_path / "eamc.bin"
    eamc.save(path)
    again = Eamc(layers, experts, 100, "big")
    again.load(path)
    assert len(again) == 100


def test_a_look_is_not_a_match_and_the_similarity_stays_in_bounds():
    eamc = Eamc(L, E, 8, "tiny")
    flat = np.zeros((L, E), np.float32)
    flat[:, :7] = 1.0  # 7 equal experts per layer: float32 rounding put its self-match a little above 1
    eamc.add(flat)
    _, best = eamc.predict(flat[None], top=1, count=False)
    assert 0.0 <= best[0] <= 1.0 and eamc.hits[0] == 0
    eamc.predict(flat[None], top=1)
    assert eamc.hits[0] == 1
