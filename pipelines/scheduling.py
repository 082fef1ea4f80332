"""Which queued job runs next: round-robin across guilds, then users, with batches and model affinity.

Pure bookkeeping, no I/O: :class:`FairScheduler` holds the queued jobs in memory (the database is the
durable copy, see :mod:`pipelines.queue`) and answers "what next" and "where does job N stand".

Fairness is start-time round-robin at two levels. Every guild and every user carries a ``rounds``
count (jobs started in the current busy period) and ``last`` (when they were last served). The next
job comes from the guild with the fewest rounds (ties: the one served longest ago), and within it from
the user with the fewest rounds (same tie rule). A user (or guild) who becomes active again joins at
the lowest round of those already active, so history from an earlier busy period buys nothing and a
newcomer waits at most for the batch already chosen. Among the users tied for the next turn, one whose
job matches what the worker has loaded (model, VAE, adapters) goes first; within a user, the oldest
matching job goes first. Batch-mates of the chosen job are the compatible jobs that come next in the
fair order, up to a budget of images and pixels.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field

__all__ = ["BatchBudget", "Entry", "FairScheduler"]

_NO_GUILD = 0


@dataclass(frozen=True)
class Entry:
    """One queued job as the scheduler sees it.

    Attributes:
        job_id: The database id (also the arrival order: ids only grow).
        user: The submitting user; None for jobs without one (the CLI).
        guild: The guild, or None (a DM or the CLI).
        images: How many images the job makes (its share of a batch).
        pixels: ``images × width × height`` of the sampled latents.
        batch_key: Jobs with equal non-None keys may share one pipeline call.
        affinity: What must be loaded to run it (model, VAE, adapters); matching the loaded one saves a swap.
        work: Its size in the units ETAs are estimated in (step × megapixel-images).
    """

    job_id: int
    user: int | None
    guild: int | None
    images: int = 1
    pixels: int = 0
    batch_key: Hashable | None = None
    affinity: Hashable | None = None
    work: float = 0.0


@dataclass(frozen=True)
class BatchBudget:
    """How much one pipeline call may take on."""

    max_images: int = 8
    max_pixels: int = 8 * 512 * 512


@dataclass
class _Turns:
    """Round-robin state of one user or guild."""

    rounds: int = 0
    last: int = -1


@dataclass
class _State:
    """Everything :func:`_pick` reads and changes."""

    queued: dict[int, dict[int, list[Entry]]] = field(default_factory=dict)  # guild -> user -> jobs
    users: dict[tuple[int, int], _Turns] = field(default_factory=dict)  # (guild, user) -> turns
    guilds: dict[int, _Turns] = field(default_factory=dict)
    clock: int = 0


def _user_key(entry: Entry) -> int:
    return entry.user if entry.user is not None else 0


def _guild_key(entry: Entry) -> int:
    return entry.guild if entry.guild is not None else _NO_GUILD


class FairScheduler:
    """The in-memory fair queue. Not thread-safe: use it from the event loop only.

    Args:
        budget: The batch budget :meth:`next_batch` fills.
        mate_scan: How far down the fair order :meth:`next_batch` looks for batch-mates.
    """

    def __init__(self, budget: BatchBudget | None = None, *, mate_scan: int = 256) -> None:
        self.budget = budget or BatchBudget()
        self.mate_scan = mate_scan
        self._state = _State()
        self._entries: dict[int, Entry] = {}
        self._running: dict[int, Entry] = {}
        self._user_active: Counter[tuple[int, int]] = Counter()  # queued + running, per (guild, user)
        self._guild_active: Counter[int] = Counter()
        self._owner_active: Counter[int | None] = Counter()  # per user over every guild
        self._order: list[Entry] | None = None
        self._positions: dict[int, tuple[int, float]] | None = None  # job -> (position, work ahead)

    # --- contents --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def get(self, job_id: int) -> Entry | None:
        return self._entries.get(job_id)

    def queued(self) -> list[Entry]:
        """The queued jobs in arrival order."""
        return sorted(self._entries.values(), key=lambda e: e.job_id)

    @property
    def running(self) -> list[Entry]:
        return list(self._running.values())

    def active_count(self, *, user: int | None = None, guild: int | None = None) -> int:
        """Queued plus running jobs of one user (over every guild), of one guild, or of everyone."""
        if user is not None:
            return self._owner_active[user]
        if guild is not None:
            return self._guild_active[guild]
        return len(self._entries) + len(self._running)

    def add(self, entry: Entry) -> None:
        """Queue a job; a user or guild that was idle joins at the current lowest round."""
        if entry.job_id in self._entries or entry.job_id in self._running:
            raise ValueError(f"job {entry.job_id} is already in the queue")
        state = self._state
        g, u = _guild_key(entry), _user_key(entry)
        if not self._guild_active[g]:
            active = [k for k, n in self._guild_active.items() if n]
            lowest = min((state.guilds[k].rounds for k in active), default=0)
            state.guilds.setdefault(g, _Turns()).rounds = lowest
        if not self._user_active[g, u]:
            active_users = [k for k, n in self._user_active.items() if n and k[0] == g]
            state.users.setdefault((g, u), _Turns()).rounds = min(
                (state.users[k].rounds for k in active_users), default=0
            )
        state.queued.setdefault(g, {}).setdefault(u, []).append(entry)
        self._entries[entry.job_id] = entry
        self._count(entry, 1)
        self._invalidate()

    def remove(self, job_id: int) -> Entry | None:
        """Take a queued job out (cancelled); returns it, or None if it was not queued."""
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return None
        _discard(self._state, entry)
        self._count(entry, -1)
        self._invalidate()
        return entry

    def finish(self, job_id: int) -> Entry | None:
        """Forget a running job (done, failed or cancelled); returns it, or None if it was not running."""
        entry = self._running.pop(job_id, None)
        if entry is not None:
            self._count(entry, -1)
        return entry

    # --- what next -------------------------------------------------------------------------------

    def next_batch(self, loaded: Hashable | None = None) -> list[Entry]:
        """Take the next job and its batch-mates (now running); empty if nothing is queued."""
        first = _pick(self._state, loaded)
        if first is None:
            return []
        batch = [first]
        if first.batch_key is not None:
            self._invalidate()
            images, pixels = first.images, first.pixels
            for mate in itertools.islice(self.order(), self.mate_scan):
                if images >= self.budget.max_images:
                    break
                fits = (
                    mate.batch_key == first.batch_key
                    and images + mate.images <= self.budget.max_images
                    and pixels + mate.pixels <= self.budget.max_pixels
                )
                if fits:
                    _serve(self._state, mate)
                    batch.append(mate)
                    images, pixels = images + mate.images, pixels + mate.pixels
        for entry in batch:
            del self._entries[entry.job_id]
            self._running[entry.job_id] = entry
        self._invalidate()
        return batch

    def order(self) -> list[Entry]:
        """Every queued job in the order it would start if nothing else arrived (cached).

        The order :meth:`next_batch` follows when nothing is loaded, computed by sorting instead of
        simulating: a user's k-th queued job runs in round ``rounds + k``; within a round, users who
        enter it afresh come first (the one served longest ago first), then those already running in
        earlier rounds, in the order they entered. The same rule orders guilds over their jobs.
        """
        if self._order is None:
            state = self._state
            keyed_jobs = []
            for g, users in state.queued.items():
                ordered = sorted(_keyed(users, {u: state.users[g, u] for u in users}))
                turns = state.guilds[g]
                head = min(jobs[0].job_id for jobs in users.values())
                for k, item in enumerate(ordered):
                    keyed_jobs.append(((turns.rounds + k, -turns.rounds, turns.last, head), item[-1]))
            keyed_jobs.sort(key=lambda pair: pair[0])
            self._order = [entry for _, entry in keyed_jobs]
        return self._order

    def position(self, job_id: int) -> int | None:
        """1 for the job that starts next, 2 after it, ...; None if it is not queued."""
        found = self._placed().get(job_id)
        return None if found is None else found[0]

    def work_ahead(self, job_id: int) -> float:
        """The work of the queued jobs that start before ``job_id`` (0 if it is not queued)."""
        found = self._placed().get(job_id)
        return 0.0 if found is None else found[1]

    def _placed(self) -> dict[int, tuple[int, float]]:
        if self._positions is None:
            placed, ahead = {}, 0.0
            for position, entry in enumerate(self.order(), start=1):
                placed[entry.job_id] = (position, ahead)
                ahead += entry.work
            self._positions = placed
        return self._positions

    # --- internals -------------------------------------------------------------------------------

    def _count(self, entry: Entry, delta: int) -> None:
        g, u = _guild_key(entry), _user_key(entry)
        self._user_active[g, u] += delta
        self._guild_active[g] += delta
        self._owner_active[entry.user] += delta

    def _invalidate(self) -> None:
        self._order = None
        self._positions = None


def _keyed(
    users: dict[int, list[Entry]], turns_of: dict[int, _Turns]
) -> list[tuple[int, int, int, int, Entry]]:
    """Sort keys for one guild's jobs: (round, -entry round, last served, head job, entry)."""
    keyed = []
    for user, jobs in users.items():
        turns = turns_of[user]
        head = jobs[0].job_id
        for k, entry in enumerate(jobs):
            keyed.append((turns.rounds + k, -turns.rounds, turns.last, head, entry))
    return keyed


def _discard(state: _State, entry: Entry) -> None:
    g, u = _guild_key(entry), _user_key(entry)
    jobs = state.queued[g][u]
    jobs.remove(entry)
    if not jobs:
        del state.queued[g][u]
        if not state.queued[g]:
            del state.queued[g]


def _serve(state: _State, entry: Entry) -> None:
    """Count a started job against its user and guild, and take it out of the queue."""
    g = _guild_key(entry)
    _discard(state, entry)
    for turns in (state.users[g, _user_key(entry)], state.guilds[g]):
        turns.rounds += 1
        turns.last = state.clock
    state.clock += 1


def _pick(state: _State, loaded: Hashable | None) -> Entry | None:
    """Choose, take and count the next job (see the module docstring for the rule)."""
    if not state.queued:
        return None

    def guild_rank(g: int) -> tuple[int, int, int]:
        turns = state.guilds[g]
        return (turns.rounds, turns.last, min(jobs[0].job_id for jobs in state.queued[g].values()))

    guild = min(state.queued, key=guild_rank)
    users = state.queued[guild]

    def user_rank(u: int) -> tuple[int, int, int]:
        turns = state.users[guild, u]
        return (turns.rounds, turns.last, users[u][0].job_id)

    ranked = sorted(users, key=user_rank)
    lowest = state.users[guild, ranked[0]].rounds
    entry = None
    if loaded is not None:
        for user in ranked:
            if state.users[guild, user].rounds != lowest:
                break
            entry = next((e for e in users[user] if e.affinity == loaded), None)
            if entry is not None:
                break
    if entry is None:
        entry = users[ranked[0]][0]
    _serve(state, entry)
    return entry
