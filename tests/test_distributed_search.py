"""dive.retrieval.ShardedSetIndex and dive.distributed on 1, 2 and 3 gloo processes against one
SetIndex over the union in ascending-id order, save/load per rank (all or nothing), and every
fault raising on every rank.

The ranks are subprocesses running this file (the __main__ block at the end), started once per
group of checks because a process takes seconds to import torch; each rank writes its outcomes
to a file that the tests here compare. A group that outlives its wall-clock limit is killed and
fails. DIVE_TEST_SEED replays a failure (the seed is in the messages).
"""
import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
import torch

import multiproc

from dive import distributed, retrieval
from dive.retrieval import SetIndex, ShardedSetIndex, search, sharded
from sets import unit_sets

# Ranks share a machine that may be busy: a rank's first op call can take half a minute there
# while a rank with an empty shard already waits in the next collective. The collective timeout
# and the wall-clock limit only catch hangs, so they are generous.
LIMIT_S = 900
TIMEOUT_S = 300  # the collective timeout the ranks run with
SHORT_TIMEOUT_S = 5  # set on rank 0 of group "two" for the one collective rank 1 never joins
DIM, SET_SIZE, NQ = 16, 4, 6


def exact_scorer(x, y, **kw):
    """Products of small ints: the same score for a pair wherever it sits, and many exact ties;
    -inf for some sets, which must still rank before a rank's padding."""
    a = (x[:, 0, 0].float() * 4).round()
    b = (y[:, 0, 0].float() * 4).round()
    return torch.where(b[None, :] <= -2, -torch.inf, a[:, None] * b[None, :] / 16)


def shuffled_shards(gen, sets, ids, sizes, masks=None):
    """Splits (sets, ids, masks) at random into shards of `sizes`, each in a random id order."""
    order = torch.randperm(len(ids), generator=gen)
    shards, start = [], 0
    for size in sizes:
        pick = order[start:start + size]
        start += size
        shards.append({"sets": sets[pick], "ids": ids[pick],
                       "mask": None if masks is None else masks[pick]})
    return shards


def union_index(shards, temperature=16.0):
    """The single-process reference: every shard's sets in one SetIndex, added by ascending id."""
    sets = torch.cat([s["sets"] for s in shards])
    ids = torch.cat([s["ids"] for s in shards])
    mask = torch.cat([torch.ones(s["sets"].shape[:2], dtype=torch.bool) if s["mask"] is None
                      else s["mask"] for s in shards])
    order = ids.argsort()
    index = SetIndex(temperature=temperature)
    index.add(sets[order], ids[order], mask[order])
    return index


def make_data(seed):
    gen = torch.Generator().manual_seed(seed)
    draw = partial(unit_sets, k=SET_SIZE, d=DIM, generator=gen)
    # 14 distinct sets, each twice under different ids: every query's best set is tied with its
    # copy, possibly on another rank, possibly later in the same shard. Shard sizes are multiples
    # of 4 with set size 4, which keeps every pair in the CPU epilogue's vector loop, where a
    # pair's score does not depend on its place (see the ShardedSetIndex docstring).
    base = draw(14)
    ids = torch.randperm(10_000, generator=gen)[:28]
    masks = torch.rand(28, SET_SIZE, generator=gen) > 0.3
    masks[:, 0] = True
    random = shuffled_shards(gen, torch.cat([base, base]), ids, (24, 4, 0), masks)
    random[1]["mask"] = None  # a shard added without a mask beside masked ones
    query_mask = torch.rand(NQ, SET_SIZE, generator=gen) > 0.3
    query_mask[:, 0] = True
    tie_ids = torch.randperm(1000, generator=gen)[:19]
    return {
        "queries": draw(NQ), "query_mask": query_mask,
        "random": random,  # a shard with fewer than k = 5 sets and an empty one
        "ties3": shuffled_shards(gen, draw(19), tie_ids, (11, 2, 6)),
        "ties2": shuffled_shards(gen, draw(14), tie_ids[:14], (9, 5)),
        "plain": shuffled_shards(gen, draw(9), torch.randperm(50, generator=gen)[:9],
                                 (5, 4)),
    }


# ----------------------------------------------------------------------------- launching ranks


def launch(group, world, workdir, data, timeout=TIMEOUT_S):
    """Runs `group` on `world` ranks; returns each rank's {check: outcome} dict."""
    return multiproc.launch(__file__, group, world, workdir, data, timeout=timeout,
                            limit_s=LIMIT_S)


@pytest.fixture(scope="module")
def seed():
    return int(os.environ.get("DIVE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


@pytest.fixture(scope="module")
def data(seed):
    return make_data(seed)


@pytest.fixture(scope="module")
def three(tmp_path_factory, data):
    workdir = tmp_path_factory.mktemp("three")
    return workdir, launch("three", 3, workdir, data)


@pytest.fixture(scope="module")
def two(tmp_path_factory, data, three):
    workdir = tmp_path_factory.mktemp("two")
    shutil.copytree(three[0] / "saved", workdir / "saved-by-three")
    return workdir, launch("two", 2, workdir, data)


@pytest.fixture(scope="module")
def one(tmp_path_factory, data):
    workdir = tmp_path_factory.mktemp("one")
    return workdir, launch("one", 1, workdir, data)


def equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(equal, a, b))
    return a == b


def same_on_every_rank(results, check):
    outcomes = [r[check] for r in results]
    for r, outcome in enumerate(outcomes[1:], 1):
        assert equal(outcome, outcomes[0]), f"{check}: rank {r} differs from rank 0"
    return outcomes[0]


def assert_found(outcome, want, msg):
    assert outcome[0] == "ok", f"{msg}: {outcome}"
    got_scores, got_ids = outcome[1]
    want_scores, want_ids = want
    assert torch.equal(got_ids, want_ids), f"{msg}\n{got_ids}\n{want_ids}"
    assert torch.equal(got_scores, want_scores), f"{msg}\n{got_scores}\n{want_scores}"


def assert_error(results, check, *fragments):
    """The same ValueError on every rank, naming each fragment."""
    outcome = same_on_every_rank(results, check)
    assert outcome[:2] == ("error", "ValueError"), f"{check}: {outcome}"
    for fragment in fragments:
        assert fragment in outcome[2], f"{check}: {fragment!r} not in {outcome[2]!r}"


# ----------------------------------------------------------------------------- tests


def test_search_equals_one_index_over_the_union(three, data, seed):
    _, results = three
    index = union_index(data["random"])
    q, qm = data["queries"], data["query_mask"]
    for k in (1, 5, 28):
        want = index.search(q, k)
        assert_found(same_on_every_rank(results, f"random k={k}"), want, f"k={k} seed={seed}")
    assert_found(same_on_every_rank(results, "random masked queries"),
                 index.search(q, 5, query_mask=qm), f"seed={seed}")
    for r in range(3):
        assert results[r]["len"] == ("ok", 28)
    assert_error(results, "k beyond the union", "k must be", "28")


def test_ties_go_to_the_lower_id(three, two, data, seed, monkeypatch):
    monkeypatch.setattr(search, "smooth_chamfer", exact_scorer)
    for (_, results), name, ks in ((three, "ties3", (1, 3, 7, 19)), (two, "ties2", (1, 4, 14))):
        index = union_index(data[name])
        for k in ks:
            assert_found(same_on_every_rank(results, f"{name} k={k}"),
                         index.search(data["queries"], k), f"{name} k={k} seed={seed}")


def test_save_load_round_trip(three, data, seed):
    workdir, results = three
    for r in range(3):
        assert (workdir / "saved" / f"shard-{r}-of-3.safetensors").exists()
        assert results[r]["load len"] == ("ok", 28)
        shard = SetIndex.load(workdir / "saved" / f"shard-{r}-of-3.safetensors")
        ids = data["random"][r]["ids"]
        assert torch.equal(shard.ids, ids.sort().values), f"rank {r} saved other ids"
    want = union_index(data["random"]).search(data["queries"], 5)
    assert_found(same_on_every_rank(results, "loaded k=5"), want, f"seed={seed}")


def test_missing_or_corrupt_shard_fails_on_every_rank(three):
    _, results = three
    assert_error(results, "load missing", "failed on 1 of 3 ranks", "rank 1:",
                 "shard-1-of-3.safetensors is missing")
    assert_error(results, "load corrupt", "failed on 1 of 3 ranks", "rank 0:", "corrupt")
    assert_error(results, "load no directory", "failed on 3 of 3 ranks", "no such directory")


def test_a_failed_save_leaves_the_previous_index(three, data, seed):
    workdir, results = three
    assert_error(results, "save failing on rank 1", "saving the shards to",
                 "failed on 1 of 3 ranks: rank 1: OSError: disk full")
    assert_error(results, "swap failing on rank 2", "putting the shards in place",
                 "failed on 1 of 3 ranks: rank 2: OSError: cannot replace")
    want = union_index(data["random"]).search(data["queries"], 5)
    for check in ("after a failed save k=5", "after a failed swap k=5"):
        assert_found(same_on_every_rank(results, check), want, f"{check} seed={seed}")
    assert sorted(os.listdir(workdir / "saved")) == [f"shard-{r}-of-3.safetensors"
                                                     for r in range(3)]


def test_load_refuses_the_shards_of_two_saves(three):
    _, results = three
    assert same_on_every_rank(results, "other save") == ("ok", None)
    assert_error(results, "load mixed", "come from different saves", "save the index again")


def test_load_with_another_world_size_fails_on_every_rank(two):
    _, results = two
    assert_error(results, "load world 3", "failed on 2 of 2 ranks",
                 "holds the shards of 3 ranks but this run has 2")


def test_mismatched_shards_or_queries_fail_on_every_rank(three):
    _, results = three
    for call in ("search", "validate", "save"):
        assert_error(results, f"dim {call}", "dim differs across ranks",
                     "rank 0: 16, rank 1: 8, rank 2: 16")
    assert_error(results, "set size search", "set_size differs across ranks", "rank 2: 3")
    assert_error(results, "other queries", "query_sets", "differs across ranks")
    assert_error(results, "other k", "k differs across ranks", "rank 2: 4")
    assert same_on_every_rank(results, "check_same agrees") == ("ok", "bfloat16")
    assert_error(results, "check_same differs", "dim differs across ranks (rank 0: 16, rank 1: 8")


def test_duplicate_ids_across_shards(three):
    _, results = three
    for call in ("search", "validate", "save"):
        assert_error(results, f"duplicate ids {call}", "unique across shards",
                     "e.g. 3 on ranks [0, 2]")


def test_world_size_one_is_a_plain_set_index(one, data, seed):
    _, (result,) = one
    q = data["queries"]
    want = union_index(data["plain"])
    for k in (1, 4, 9):
        assert_found(result[f"plain k={k}"], want.search(q, k), f"k={k} seed={seed}")
    assert result["len"] == ("ok", 9)
    assert_found(result["loaded k=4"], want.search(q, 4), f"seed={seed}")
    assert result["uninitialised"][:2] == ("error", "RuntimeError")


def test_a_silent_rank_fails_the_others_at_the_timeout(two):
    _, results = two
    outcome = results[0]["search while rank 1 waits"]
    # Rank 1 stays alive (its connections open) until rank 0 is done: only a timeout ends this.
    assert outcome[:2] == ("error", "RuntimeError") and "Timed out" in outcome[2], outcome
    assert results[0]["seconds"] > SHORT_TIMEOUT_S - 1, results[0]
    assert results[1]["waited"] == ("ok", None)


def test_init_without_torchrun_is_a_clear_error(monkeypatch):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="lacks RANK, WORLD_SIZE.*torchrun"):
        distributed.init(backend="gloo")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    for name, value in (("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="RANK < WORLD_SIZE.*RANK=2 WORLD_SIZE=2"):
        distributed.init(backend="gloo")
    with pytest.raises(ValueError, match="timeout"):
        distributed.init(timeout=0)
    assert not torch.distributed.is_initialized()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()


def test_process_group_helpers_do_not_import_retrieval():
    assert retrieval.ShardedSetIndex is sharded.ShardedSetIndex
    code = "import sys, dive.distributed; assert 'dive.retrieval' not in sys.modules, sys.modules"
    subprocess.run([sys.executable, "-P", "-c", code], check=True)


# ----------------------------------------------------------------------------- the ranks


def attempt(results, check, fn):
    try:
        results[check] = ("ok", fn())
    except Exception as exc:
        results[check] = ("error", type(exc).__name__, str(exc))


def load_nothing(directory):
    """Loads and drops an index: the outcome files hold plain data only."""
    ShardedSetIndex.load(directory)


def filled(shard, dim=DIM):
    index = ShardedSetIndex()
    if len(shard["ids"]):
        index.add(shard["sets"][..., :dim], shard["ids"], shard["mask"])
    return index


def rank_three(r, data, workdir, results):
    q, qm = data["queries"], data["query_mask"]
    index = filled(data["random"][r])
    for k in (1, 5, 28):
        attempt(results, f"random k={k}", lambda: index.search(q, k))
    attempt(results, "random masked queries", lambda: index.search(q, 5, query_mask=qm))
    attempt(results, "len", lambda: len(index))
    attempt(results, "k beyond the union", lambda: index.search(q, 29))
    attempt(results, "other queries", lambda: index.search(q if r != 1 else q + 1, 5))
    attempt(results, "other k", lambda: index.search(q, 5 if r != 2 else 4))

    original = search.smooth_chamfer
    search.smooth_chamfer = exact_scorer
    ties = filled(data["ties3"][r])
    for k in (1, 3, 7, 19):
        attempt(results, f"ties3 k={k}", lambda: ties.search(q, k))
    search.smooth_chamfer = original

    saved = workdir / "saved"
    # A shard never searched is still in its random id order: save writes it sorted.
    attempt(results, "save", lambda: filled(data["random"][r]).save(saved))
    loaded = ShardedSetIndex.load(saved)
    attempt(results, "load len", lambda: len(loaded))
    attempt(results, "loaded k=5", lambda: loaded.search(q, 5))
    if r == 0:
        shutil.copytree(saved, workdir / "missing")
        (workdir / "missing" / "shard-1-of-3.safetensors").unlink()
        shutil.copytree(saved, workdir / "corrupt")
        path = workdir / "corrupt" / "shard-0-of-3.safetensors"
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
    torch.distributed.barrier()
    for check, folder in (("load missing", "missing"), ("load corrupt", "corrupt"),
                          ("load no directory", "nowhere")):
        attempt(results, check, lambda: load_nothing(workdir / folder))

    failed_saves(r, data, workdir, results)

    narrow = filled(data["random"][0], dim=8 if r == 1 else DIM)
    for call, fn in (("search", lambda: narrow.search(q[..., :DIM], 1)),
                     ("validate", narrow.validate), ("save", lambda: narrow.save(workdir / "x"))):
        attempt(results, f"dim {call}", fn)
    attempt(results, "check_same agrees", lambda: distributed.check_same("dtype", "bfloat16"))
    attempt(results, "check_same differs", lambda: distributed.check_same("dim", 8 if r else 16))
    fewer = ShardedSetIndex()
    shard = data["random"][0]
    fewer.add(shard["sets"][:, :3] if r == 2 else shard["sets"], shard["ids"])
    attempt(results, "set size search", lambda: fewer.search(q, 1))

    twice = ShardedSetIndex()
    twice.add(data["random"][0]["sets"][:5], [10 * r + i if r != 2 else [3, 21, 22, 23, 24][i]
                                              for i in range(5)])
    for call, fn in (("search", lambda: twice.search(q, 1)), ("validate", twice.validate),
                     ("save", lambda: twice.save(workdir / "y"))):
        attempt(results, f"duplicate ids {call}", fn)


def failed_saves(r, data, workdir, results):
    """A save that fails on one rank, writing or putting the files in place, leaves the index
    saved before; a folder mixing the shards of two saves does not load."""
    q, saved = data["queries"], workdir / "saved"
    other = filled(data["ties3"][r])

    def broken_write(*args, **kw):
        raise OSError("disk full")

    write, replace = sharded.write_index, os.replace
    if r == 1:
        sharded.write_index = broken_write
    attempt(results, "save failing on rank 1", lambda: other.save(saved))
    sharded.write_index = write
    attempt(results, "after a failed save k=5", lambda: ShardedSetIndex.load(saved).search(q, 5))

    def broken_replace(src, dst):
        if str(src).endswith(".tmp"):  # the new shard's move into place
            raise OSError(f"cannot replace {dst}")
        replace(src, dst)

    if r == 2:
        os.replace = broken_replace
    attempt(results, "swap failing on rank 2", lambda: other.save(saved))
    os.replace = replace
    attempt(results, "after a failed swap k=5", lambda: ShardedSetIndex.load(saved).search(q, 5))

    attempt(results, "other save", lambda: other.save(workdir / "other"))
    if r == 0:
        shutil.copytree(saved, workdir / "mixed")
        shutil.copy(workdir / "other" / "shard-1-of-3.safetensors", workdir / "mixed")
    torch.distributed.barrier()
    attempt(results, "load mixed", lambda: load_nothing(workdir / "mixed"))


def rank_two(r, data, workdir, results):
    q = data["queries"]
    attempt(results, "load world 3", lambda: load_nothing(workdir / "saved-by-three"))
    search.smooth_chamfer = exact_scorer
    ties = filled(data["ties2"][r])
    for k in (1, 4, 14):
        attempt(results, f"ties2 k={k}", lambda: ties.search(q, k))
    searched = workdir / "rank-0-searched"
    if r == 1:
        # Alive but never joining: rank 0 must give up at the timeout, not wait for ever.
        attempt(results, "waited", lambda: wait_for(searched))
        torch.save(results, workdir / "result-1.pt")
        os._exit(0)  # no shutdown handshake with a rank whose collective failed
    torch.distributed.distributed_c10d._set_pg_timeout(timedelta(seconds=SHORT_TIMEOUT_S))
    start = time.monotonic()
    attempt(results, "search while rank 1 waits", lambda: ties.search(q, 1))
    results["seconds"] = time.monotonic() - start
    searched.touch()


def wait_for(path):
    deadline = time.monotonic() + LIMIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def rank_one(r, data, workdir, results):
    q = data["queries"]
    index = ShardedSetIndex()
    for part in data["plain"]:  # two adds, neither in id order
        index.add(part["sets"], part["ids"])
    for k in (1, 4, 9):
        attempt(results, f"plain k={k}", lambda: index.search(q, k))
    attempt(results, "len", lambda: len(index))
    index.save(workdir / "saved")
    loaded = ShardedSetIndex.load(workdir / "saved")
    attempt(results, "loaded k=4", lambda: loaded.search(q, 4))
    torch.distributed.destroy_process_group()
    attempt(results, "uninitialised", ShardedSetIndex)


if __name__ == "__main__":
    group, workdir = sys.argv[1], Path(sys.argv[2])
    shared = torch.load(workdir / "data.pt")
    r, _ = distributed.init(backend="gloo", timeout=float(os.environ["TEST_TIMEOUT"]))
    results = {}
    {"three": rank_three, "two": rank_two, "one": rank_one}[group](r, shared, workdir, results)
    torch.save(results, workdir / f"result-{r}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
