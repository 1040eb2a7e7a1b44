"""A PLC power cycle against the real link: the VirtualPlc restarts (queue, seq, counters lost), the Modbus link
notices it from the registers and resynchronises, and commands flow again from seq 1 (issue 15)."""

from __future__ import annotations

import pytest

from sorter.core.messages import Outcome
from tests.conftest import wait_until
from tests.test_plc_link import LEAD, command, rig

pytestmark = pytest.mark.wire


async def test_a_plc_restart_is_noticed_and_the_mailbox_starts_again_from_seq_1() -> None:
    # the restart is noticed from the registers, not a timeout: a 1 s answer timeout instead of the rig's 0.3 s
    # keeps a pause of this test process (the PLC and the link share its loop) from looking like a second outage
    async with rig(timeout_s=1.0) as r:
        await r.run_belt()
        before = [await r.link.send(command(r, i, r.ahead(0.1 + 0.01 * i)), LEAD) for i in range(5)]
        assert [res.outcome for res in before] == [Outcome.ACCEPTED] * 5 and before[-1].seq == 5
        await wait_until(lambda: r.link.status.ejects_done == 5, what="the five fired")
        lost = command(r, 5, r.ahead(1.5))
        queued = await r.link.send(lost, LEAD)  # accepted, due in 1.5 s: lost with the PLC's queue in the restart
        assert queued.outcome is Outcome.ACCEPTED
        await r.plc.restart(down_s=0.3)
        assert r.plc.queue == [] and r.plc.last_seq == 0 and not r.belt.running
        await wait_until(lambda: r.link.online and r.link.restarts == 1, 5.0, "the link back, the restart noticed")
        assert r.link.mailbox.last_accepted == 0
        assert r.link.status.ejects_done == 5  # the running total goes on across the PLC's counter reset
        await r.run_belt()  # the line restarts its belt (LineControl: Unholding); the clock model locks on again
        after = await r.link.send(command(r, 6, r.ahead(0.15)), LEAD)
        assert after.outcome is Outcome.ACCEPTED and after.seq == 1
        await wait_until(lambda: r.link.status.ejects_done == 6, what="it fired")
        await r.passed(lost.open_at, 5.0)
        assert r.link.restarts == 1
        assert lost.open_at not in {ex.open_at for ex in r.fired}  # the restart dropped it: it never fired
