"""The fair scheduler on its own: round-robin, newcomers, guilds, batches, affinity, positions."""

from __future__ import annotations

import copy
import random

from pipelines.scheduling import BatchBudget, Entry, FairScheduler, _pick


def _entry(job_id: int, user: int, guild: int | None = None, key: object = "k", **kw: object) -> Entry:
    return Entry(job_id=job_id, user=user, guild=guild, batch_key=key, pixels=64 * 64, **kw)  # type: ignore[arg-type]


def _drain(s: FairScheduler) -> list[list[int]]:
    batches = []
    while batch := s.next_batch():
        batches.append([e.job_id for e in batch])
        for e in batch:
            s.finish(e.job_id)
    return batches


def test_heavy_user_delays_newcomers_by_at_most_one_job() -> None:
    s = FairScheduler(BatchBudget(max_images=1))
    for i in range(40):
        s.add(_entry(i + 1, user=1))
    first = s.next_batch()
    assert [e.job_id for e in first] == [1]
    for n in range(10):
        s.add(_entry(100 + n, user=10 + n))
    s.finish(1)
    order = [b[0] for b in _drain(s)]
    assert order[:10] == list(range(100, 110))  # every newcomer before the heavy user's 2nd job
    assert order[10:] == list(range(2, 41))


def test_batches_fill_in_fair_order_and_stay_fair() -> None:
    s = FairScheduler(BatchBudget(max_images=4))
    for i in range(40):
        s.add(_entry(i + 1, user=1))
    assert [e.job_id for e in s.next_batch()] == [1, 2, 3, 4]  # alone, the heavy user fills the batch
    for n in range(10):
        s.add(_entry(100 + n, user=10 + n))
    done: list[int] = []
    for batch in _drain(s):
        done.extend(batch)
    heavy = [j for j in done if j < 100]
    fifth = done.index(heavy[4])
    assert all(done.index(100 + n) < fifth for n in range(10))


def test_incompatible_jobs_never_share_a_batch_and_budget_holds() -> None:
    s = FairScheduler(BatchBudget(max_images=8, max_pixels=3 * 64 * 64))
    for i in range(6):
        s.add(_entry(i + 1, user=i, key="a" if i % 2 else "b"))
    s.add(_entry(7, user=7, key=None))
    batches = _drain(s)
    for batch in batches:
        keys = {("a" if (j - 1) % 2 else "b") if j != 7 else None for j in batch}
        assert len(keys) == 1 and len(batch) <= 3
    assert sorted(j for b in batches for j in b) == list(range(1, 8))
    assert [7] in batches


def test_guilds_take_turns_before_users() -> None:
    s = FairScheduler(BatchBudget(max_images=1))
    for i in range(6):  # guild 1 has three busy users
        s.add(_entry(i + 1, user=i % 3, guild=1))
    s.add(_entry(50, user=9, guild=2))
    order = [b[0] for b in _drain(s)]
    assert order.index(50) <= 1


def test_returning_user_gets_no_credit_for_an_idle_past() -> None:
    s = FairScheduler(BatchBudget(max_images=1))
    s.add(_entry(1, user=1))
    assert _drain(s) == [[1]]
    for i in range(5):
        s.add(_entry(10 + i, user=2))
    s.next_batch()  # user 2 runs one job
    s.add(_entry(20, user=1))
    s.add(_entry(21, user=1))
    order = [b[0] for b in _drain(s)]
    # user 1 joins at user 2's round: they alternate instead of user 1 catching up on rounds
    assert order[:4] == [20, 11, 21, 12]


def test_affinity_prefers_the_loaded_model_among_tied_users_only() -> None:
    s = FairScheduler(BatchBudget(max_images=1))
    s.add(_entry(1, user=1, affinity="m1"))
    s.add(_entry(2, user=2, affinity="m2"))
    s.add(_entry(3, user=3, affinity="m2"))
    assert [e.job_id for e in s.next_batch(loaded="m2")] == [2]
    s.finish(2)
    # user 1 and 3 are tied: the loaded model still wins
    assert [e.job_id for e in s.next_batch(loaded="m2")] == [3]
    # user 2 comes back tied with user 1 (same round): of user 2's jobs the matching one goes first...
    s.add(_entry(4, user=2, affinity="m1"))
    s.add(_entry(5, user=2, affinity="m2"))
    assert [e.job_id for e in s.next_batch(loaded="m2")] == [5]
    # ...but affinity never buys a second turn in a round: user 1 comes next, whatever is loaded
    assert [e.job_id for e in s.next_batch(loaded="m2")] == [1]


def test_positions_and_eta_follow_the_order() -> None:
    s = FairScheduler(BatchBudget(max_images=1))
    for i in range(3):
        s.add(_entry(i + 1, user=1, work=2.0))
    s.add(_entry(4, user=2, work=5.0))
    assert [e.job_id for e in s.order()] == [1, 4, 2, 3]
    assert s.position(4) == 2 and s.position(3) == 4 and s.position(99) is None
    assert s.work_ahead(3) == 2.0 + 5.0 + 2.0
    assert s.remove(4) is not None and s.position(3) == 3
    assert s.active_count(user=1) == 3 and s.active_count() == 3


def test_sorted_order_matches_step_by_step_simulation() -> None:
    rng = random.Random(7)
    for _ in range(30):
        s = FairScheduler(BatchBudget(max_images=1))
        next_id = 1
        for _ in range(rng.randint(5, 60)):
            if rng.random() < 0.7 or not len(s):
                s.add(_entry(next_id, user=rng.randint(1, 6), guild=rng.choice([None, 1, 2])))
                next_id += 1
            else:
                for e in s.next_batch():
                    if rng.random() < 0.5:
                        s.finish(e.job_id)
        state = copy.deepcopy(s._state)
        simulated = []
        while (e := _pick(state, None)) is not None:
            simulated.append(e.job_id)
        assert [e.job_id for e in s.order()] == simulated
