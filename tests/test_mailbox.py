"""Mailbox seq/slot rules, checked against a model PLC under arbitrary interleavings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sorter.drivers.plc.mailbox import SEQ_MAX, Mailbox, MailboxDesync, MailboxFull, next_seq

pytestmark = pytest.mark.fast


class ModelPlc:
    """Accepts strictly in order from slot contents, like docs/plc-interface.md says."""

    def __init__(self, slot_count: int, last: int) -> None:
        self.slots = [0] * slot_count
        self.last = last
        self.accepted: list[int] = []

    def write(self, slot: int, seq: int) -> None:
        self.slots[slot] = seq

    def scan(self, room: int) -> None:
        """Accept up to `room` commands (the eject queue's free space this scan)."""
        for _ in range(room):
            expected = next_seq(self.last)
            if self.slots[expected % len(self.slots)] != expected:
                return
            self.last = expected
            self.accepted.append(expected)


@given(st.integers(min_value=0, max_value=SEQ_MAX))
def test_next_seq_skips_zero_and_wraps(seq: int) -> None:
    n = next_seq(seq)
    assert 1 <= n <= SEQ_MAX
    assert n == (1 if seq in (0, SEQ_MAX) else seq + 1)


def test_wrap_and_slots_by_hand() -> None:
    mb = Mailbox(16, last_accepted=65533)
    assert [mb.reserve() for _ in range(3)] == [(65534, 14), (65535, 15), (1, 1)]
    assert mb.pending == 3 and mb.pending_seqs == (65534, 65535, 1)
    assert mb.on_accepted(65535) == [65534, 65535]
    assert mb.on_accepted(65535) == []  # a stale poll changes nothing
    assert mb.on_accepted(1) == [1] and mb.last_accepted == 1 and mb.pending == 0


def test_slot_collision_across_the_wrap() -> None:
    # 65530 sits in slot 10; after the wrap seq 10 wants slot 10 too, only 12 seqs later
    mb = Mailbox(16, last_accepted=65529)
    got = []
    while mb.can_write():
        got.append(mb.reserve())
    assert got[0] == (65530, 10) and got[-1] == (9, 9) and mb.next_seq == 10
    assert len(got) == 15  # one short of 16: the skipped seq 0 costs a slot here
    with pytest.raises(MailboxFull):
        mb.reserve()
    mb.on_accepted(65530)
    assert mb.can_write() and mb.reserve() == (10, 10)


def test_desync_and_resync() -> None:
    mb = Mailbox(16, last_accepted=7)
    mb.reserve()
    with pytest.raises(MailboxDesync):
        mb.on_accepted(3)
    mb.resync(3)
    assert mb.pending == 0 and mb.next_seq == 4 and mb.can_write()
    with pytest.raises(ValueError):
        mb.resync(70000)


@settings(max_examples=300, deadline=None)
@given(
    slot_count=st.sampled_from([2, 3, 4, 16]),
    start=st.one_of(st.integers(0, SEQ_MAX), st.integers(SEQ_MAX - 40, SEQ_MAX)),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.integers(1, 20)),
            st.tuples(st.just("scan"), st.integers(0, 20)),
            st.tuples(st.just("poll"), st.booleans()),
        ),
        max_size=120,
    ),
)
def test_never_overwrites_an_unaccepted_slot(slot_count: int, start: int, ops: list[tuple[str, int]]) -> None:
    mb = Mailbox(slot_count, last_accepted=start)
    plc = ModelPlc(slot_count, start)
    written: list[int] = []
    reported: list[int] = []  # register 5 after each PLC scan, oldest first
    seen = -1  # index of the newest report the PC has seen (polls never go back in time)
    for op, arg in ops:
        if op == "write":
            for _ in range(arg):
                if not mb.can_write():
                    break
                seq, slot = mb.reserve()
                assert seq != 0 and slot == seq % slot_count
                held = plc.slots[slot]
                # the slot is empty or its seq was already accepted by the PLC
                assert held == 0 or held in plc.accepted
                plc.write(slot, seq)
                written.append(seq)
        elif op == "scan":
            plc.scan(arg)
            reported.append(plc.last)
        elif reported:  # a poll: the latest report, or (lagging) the oldest one not yet seen
            seen = len(reported) - 1 if arg else min(seen + 1, len(reported) - 1)
            newly = mb.on_accepted(reported[seen])
            assert all(s in plc.accepted for s in newly)
    # accepted exactly the written seqs, in order, as far as the PLC got
    assert plc.accepted == written[: len(plc.accepted)]
    # and after a final scan/poll everything written is accepted and the mailbox is free again
    plc.scan(len(written) + 1)
    mb.on_accepted(plc.last)
    assert plc.accepted == written and mb.pending == 0 and mb.can_write()


@given(st.integers(0, SEQ_MAX), st.integers(1, 200))
def test_seqs_are_consecutive_through_the_wrap(start: int, n: int) -> None:
    mb = Mailbox(16, last_accepted=start)
    seqs = []
    for _ in range(n):
        if not mb.can_write():
            mb.on_accepted(mb.pending_seqs[-1])
        seqs.append(mb.reserve()[0])
    expected, s = [], start
    for _ in range(n):
        s = next_seq(s)
        expected.append(s)
    assert seqs == expected
