"""The PC side of the PLC's command mailbox: sequence numbers and slot reuse.

Pure logic, no I/O. Rules (docs/plc-interface.md):
- seq runs 1..65535 and skips 0 (65535 -> 1); 0 in a slot means "never written";
- a command goes to slot seq % slot_count;
- the PLC accepts strictly in order and reports the last seq it accepted;
- the PC never overwrites a slot that still holds an unaccepted seq.

Because 65535 is not a multiple of the slot count, slot order is not a plain
round robin across the seq wrap (65535 -> slot 15, then 1 -> slot 1 with 16
slots): two unaccepted seqs can map to the same slot, so "pending < slots" is
not enough and the check is made per slot.
"""

from __future__ import annotations

from collections import deque

SEQ_MAX = 0xFFFF


def next_seq(seq: int) -> int:
    """The seq after `seq` (0, meaning "none yet", is followed by 1)."""
    return seq % SEQ_MAX + 1


class MailboxFull(RuntimeError):
    """reserve() was called while can_write() is False."""


class MailboxDesync(ValueError):
    """The PLC reported a seq the PC has not written (PLC restarted or another writer)."""


class Mailbox:
    def __init__(self, slot_count: int = 16, last_accepted: int = 0) -> None:
        if slot_count < 2:
            raise ValueError("a mailbox needs at least 2 slots")
        self.slot_count = slot_count
        self._last_accepted = 0
        self._pending: deque[int] = deque()  # reserved, not yet accepted, in seq order
        self._busy: set[int] = set()  # slots holding those seqs
        self.resync(last_accepted)

    # --- state ---
    @property
    def last_accepted(self) -> int:
        return self._last_accepted

    @property
    def next_seq(self) -> int:
        """The seq reserve() hands out next."""
        return next_seq(self._pending[-1] if self._pending else self._last_accepted)

    @property
    def pending(self) -> int:
        """Commands written (or being written) and not yet accepted."""
        return len(self._pending)

    @property
    def pending_seqs(self) -> tuple[int, ...]:
        return tuple(self._pending)

    def slot_of(self, seq: int) -> int:
        return seq % self.slot_count

    def can_write(self) -> bool:
        """True if the next seq's slot holds no unaccepted seq."""
        return self.slot_of(self.next_seq) not in self._busy

    # --- transitions ---
    def reserve(self) -> tuple[int, int]:
        """Take the next seq; returns (seq, slot). The caller must then write that slot."""
        if not self.can_write():
            raise MailboxFull(f"slot {self.slot_of(self.next_seq)} still holds unaccepted seq")
        seq = self.next_seq
        slot = self.slot_of(seq)
        self._pending.append(seq)
        self._busy.add(slot)
        return seq, slot

    def on_accepted(self, last_seq: int) -> list[int]:
        """The PLC reports `last_seq` as its last accepted seq; returns the newly accepted seqs.

        Raises MailboxDesync if `last_seq` is neither the known last accepted
        seq nor one of ours pending (the caller should then resync()).
        """
        if last_seq == self._last_accepted:
            return []
        if last_seq not in self._pending:
            raise MailboxDesync(
                f"PLC reports last accepted seq {last_seq}, but the PC last saw {self._last_accepted} "
                f"and has {list(self._pending)} pending"
            )
        done: list[int] = []
        while True:
            seq = self._pending.popleft()
            self._busy.discard(self.slot_of(seq))
            done.append(seq)
            if seq == last_seq:
                break
        self._last_accepted = last_seq
        return done

    def resync(self, last_accepted: int) -> None:
        """Start over from the PLC's last accepted seq (on connect); forgets anything pending."""
        if not 0 <= last_accepted <= SEQ_MAX:
            raise ValueError(f"seq {last_accepted} out of range 0..{SEQ_MAX}")
        self._last_accepted = last_accepted
        self._pending.clear()
        self._busy.clear()
