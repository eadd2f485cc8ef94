"""edgeterm.keyring: the ticket key ring's rules, with an injected clock and a fake key store.

The ring only deals in slot numbers; the store is two callables that record what the ring asks
of them (fill a slot with random bytes, wipe a retired one).
"""

from __future__ import annotations

import pytest

from edgeterm.keyring import CAPACITY, MAX_FILE_KEYS, KeyFileError, KeyRing

W1, W2 = 101, 102  # worker ids (pids in the supervisor)


class FakeStore:
    """Records the ring's requests; ``live`` is the set of slots holding a key."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.live: set[int] = set()

    def fill(self, slot: int) -> None:
        assert slot not in self.live, f"slot {slot} filled while it holds a live key"
        self.calls.append(("fill", slot))
        self.live.add(slot)

    def wipe(self, slot: int) -> None:
        self.calls.append(("wipe", slot))
        self.live.discard(slot)

    def load(self, slot: int) -> None:
        """What the caller does with a slot from ``take()`` (a key file read into it)."""
        self.live.add(slot)

    def take_calls(self) -> list[tuple[str, int]]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def ring(store: FakeStore) -> KeyRing:
    r = KeyRing(store.fill, store.wipe, now=1000.0)
    store.take_calls()
    return r


def acked_rotate(ring: KeyRing, now: float, workers: tuple[int, ...] = (W1, W2)) -> None:
    for w in workers:
        ring.ack(w, ring.seq)
    assert ring.rotate(now, workers)


# --- a new ring ---


def test_a_new_ring_has_a_current_and_a_next_key_filled_at_random(store: FakeStore) -> None:
    ring = KeyRing(store.fill, store.wipe, now=5.0)
    assert store.take_calls() == [("fill", ring.current), ("fill", ring.next)]
    assert ring.previous is None
    assert ring.current != ring.next
    assert ring.order() == (ring.current, ring.next)
    assert (ring.seq, ring.rotations, ring.from_files) == (1, 0, False)
    assert ring.age(5.0) == 0.0
    assert ring.age(65.5) == 60.5


def test_order_is_current_next_previous(ring: KeyRing) -> None:
    acked_rotate(ring, 1010.0)
    assert ring.previous is not None and ring.next is not None
    assert ring.order() == (ring.current, ring.next, ring.previous)
    assert len(set(ring.order())) == 3


# --- rotation and acknowledgements ---


def test_rotate_refuses_until_every_worker_acked_the_current_seq(
    ring: KeyRing, store: FakeStore
) -> None:
    before = (ring.previous, ring.current, ring.next, ring.seq, ring.rotations)
    assert not ring.rotate(1010.0, [W1, W2])  # nobody acked
    ring.ack(W1, ring.seq)
    assert not ring.rotate(1010.0, [W1, W2])  # W2 has not
    ring.ack(W2, ring.seq - 1)
    assert not ring.rotate(1010.0, [W1, W2])  # W2 acked an older ring
    assert (ring.previous, ring.current, ring.next, ring.seq, ring.rotations) == before
    assert store.take_calls() == []  # a refused rotation neither fills nor wipes
    assert ring.current_since == 1000.0

    ring.ack(W2, ring.seq)
    assert ring.all_acked([W1, W2])
    assert ring.rotate(1010.0, [W1, W2])


def test_rotate_shifts_the_ring_and_fills_a_new_next(ring: KeyRing, store: FakeStore) -> None:
    old_current, old_next = ring.current, ring.next
    acked_rotate(ring, 1010.0)
    assert (ring.previous, ring.current) == (old_current, old_next)
    assert ring.next not in (old_current, old_next)
    assert store.take_calls() == [("fill", ring.next)]  # nothing retired yet
    assert (ring.seq, ring.rotations, ring.current_since) == (2, 1, 1010.0)


def test_rotate_wipes_the_retired_key(ring: KeyRing, store: FakeStore) -> None:
    acked_rotate(ring, 1010.0)
    store.take_calls()
    retired = ring.previous
    assert retired is not None
    acked_rotate(ring, 1020.0)
    calls = store.take_calls()
    assert ("wipe", retired) in calls
    assert [c for c in calls if c[0] == "fill"] == [("fill", ring.next)]
    assert retired not in ring.order()
    assert retired not in store.live
    assert store.live == set(ring.order())


def test_acks_of_an_older_ring_do_not_allow_the_next_rotation(ring: KeyRing) -> None:
    acked_rotate(ring, 1010.0)  # both acked seq 1; the ring is now seq 2
    assert ring.seq == 2
    assert not ring.all_acked([W1, W2])
    assert not ring.rotate(1020.0, [W1, W2])
    acked_rotate(ring, 1020.0)
    assert ring.seq == 3


def test_ack_keeps_the_highest_seq(ring: KeyRing) -> None:
    ring.ack(W1, 5)
    ring.ack(W1, 2)  # a late, older ack
    ring.seq = 5
    assert ring.all_acked([W1])


def test_a_forgotten_worker_no_longer_counts_as_having_acked(ring: KeyRing) -> None:
    ring.ack(W1, ring.seq)
    ring.ack(W2, ring.seq)
    ring.forget(W2)
    assert ring.all_acked([W1])  # W2 is gone: not among the workers to wait for
    assert not ring.all_acked([W1, W2])  # a new process with the same pid starts from zero
    ring.forget(W2)  # forgetting twice is harmless


def test_without_workers_rotation_is_immediate(ring: KeyRing) -> None:
    assert ring.rotate(1001.0, [])
    assert ring.rotate(1002.0, [])
    assert ring.rotations == 2


def test_seq_increments_once_per_change(ring: KeyRing, store: FakeStore) -> None:
    seqs = [ring.seq]
    for i in range(3):
        acked_rotate(ring, 1010.0 + i)
        seqs.append(ring.seq)
    slot = ring.take()
    store.load(slot)
    ring.use_file_slots([slot], 1100.0)
    seqs.append(ring.seq)
    assert seqs == [1, 2, 3, 4, 5]
    assert ring.rotations == 4


def test_age_resets_on_rotation_only(ring: KeyRing) -> None:
    assert ring.age(1030.0) == 30.0
    assert not ring.rotate(1030.0, [W1])  # refused: the age keeps growing
    assert ring.age(1040.0) == 40.0
    acked_rotate(ring, 1040.0, (W1,))
    assert ring.age(1040.0) == 0.0
    assert ring.age(1041.5) == 1.5


# --- what a ticket survives ---


def test_a_ticket_key_survives_one_rotation_not_two(ring: KeyRing, store: FakeStore) -> None:
    issued_under = ring.current  # a ticket issued now names this key
    acked_rotate(ring, 1010.0)
    assert issued_under in ring.order()  # decrypts (as previous: resumed and renewed)
    assert ring.order()[0] != issued_under  # ...but no longer encrypts
    acked_rotate(ring, 1020.0)
    assert issued_under not in ring.order()  # a full handshake
    assert issued_under not in store.live  # and its bytes are gone


def test_a_key_reaches_workers_as_next_before_it_encrypts(ring: KeyRing) -> None:
    for i in range(5):
        upcoming = ring.next
        assert upcoming in ring.order()[1:]  # sent to workers, decrypt-only
        acked_rotate(ring, 1010.0 + i)
        assert ring.order()[0] == upcoming  # only then does it encrypt


def test_many_rotations_reuse_slots_without_leaking(store: FakeStore) -> None:
    ring = KeyRing(store.fill, store.wipe, now=0.0, capacity=4)  # three live + the new one
    for i in range(1, 1000):
        acked_rotate(ring, float(i))
        assert len(set(ring.order())) == 3
        assert store.live == set(ring.order())
    assert ring.rotations == 999


def test_running_out_of_slots_is_an_error(store: FakeStore) -> None:
    ring = KeyRing(store.fill, store.wipe, now=0.0, capacity=2)
    with pytest.raises(RuntimeError, match="no free ticket key slot"):
        ring.take()


def test_capacity_allows_staging_a_full_set_of_files() -> None:
    assert CAPACITY >= 2 * MAX_FILE_KEYS + 3


# --- key files ---


def load_slots(ring: KeyRing, store: FakeStore, n: int) -> list[int]:
    slots = [ring.take() for _ in range(n)]
    for slot in slots:
        store.load(slot)
    return slots


def test_use_file_slots_switches_to_the_files_and_wipes_the_generated_keys(
    ring: KeyRing, store: FakeStore
) -> None:
    generated = set(ring.order())
    slots = load_slots(ring, store, 2)
    assert not generated & set(slots)
    ring.use_file_slots(slots, 1050.0)
    assert ring.from_files
    assert ring.order() == tuple(slots)  # the first file encrypts, all decrypt
    assert (ring.current, ring.previous, ring.next) == (slots[0], None, None)
    assert sorted(slot for op, slot in store.take_calls() if op == "wipe") == sorted(generated)
    assert store.live == set(slots)
    assert (ring.seq, ring.rotations, ring.age(1050.0)) == (2, 1, 0.0)


def test_with_files_the_timer_does_not_rotate(ring: KeyRing, store: FakeStore) -> None:
    ring.use_file_slots(load_slots(ring, store, 1), 1050.0)
    ring.ack(W1, ring.seq)
    order, seq = ring.order(), ring.seq
    assert not ring.rotate(9999.0, [W1])
    assert (ring.order(), ring.seq) == (order, seq)


def test_new_files_replace_old_ones_and_keep_shared_slots(ring: KeyRing, store: FakeStore) -> None:
    first = load_slots(ring, store, 2)
    ring.use_file_slots(first, 1050.0)
    store.take_calls()
    second = load_slots(ring, store, 2)
    # a new first key, the old first key second (a fleet-wide rotation) - here the old slot is
    # reused as is, as a caller would after re-reading the same bytes
    ring.use_file_slots([second[0], first[0]], 1060.0)
    assert ring.order() == (second[0], first[0])
    wiped = [slot for op, slot in store.take_calls() if op == "wipe"]
    assert wiped == [first[1]]
    assert first[0] in store.live
    # the unused staged slot is the caller's to release
    ring.release([second[1]])
    assert store.live == {second[0], first[0]}


def test_use_file_slots_needs_at_least_one_key(ring: KeyRing) -> None:
    order, seq = ring.order(), ring.seq
    with pytest.raises(KeyFileError, match="no ticket keys"):
        ring.use_file_slots([], 1050.0)
    assert (ring.order(), ring.seq, ring.from_files) == (order, seq, False)


def test_released_slots_are_wiped_and_reusable(ring: KeyRing, store: FakeStore) -> None:
    slots = load_slots(ring, store, 3)
    ring.release(slots)
    assert [c for c in store.take_calls()] == [("wipe", s) for s in slots]
    again = {ring.take() for _ in range(CAPACITY - 2)}  # every free slot, the released too
    assert set(slots) <= again
