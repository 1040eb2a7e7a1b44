"""The line's PackML state machine at work: commands from people, conditions from the line.

Commands (CLI, OPC UA, later the HMI) go through `command()`; the acting
states' work runs here:
- Resetting: PLC reset (clears a tripped watchdog or queue overflow);
- Starting: the PLC link up and the clock model locked, PLC reset, belt on, every
  camera delivering frames, within `states.start_timeout_s` - else the line stops;
- Holding/Held: ejection into the products stops (every piece goes to the default
  fraction and is recorded as held); the belt keeps running;
- Unholding: PLC reset if its watchdog tripped meanwhile, belt on again;
- Stopping: belt off; Aborting (the e-stop path): belt off at once; Clearing: PLC reset.
The line's own conditions (`supervise()`): the PLC link lost, or its watchdog tripped
→ Hold (lifted by itself, with a PLC reset, when the link is back, unless an operator
held the line too); no piece for
`states.starved_after_s` → Suspend, the next piece → Unsuspend; the PLC's e-stop → Abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from sorter.config import StateMachineConfig
from sorter.core.messages import PlcStatus
from sorter.core.packml import Command, InvalidState, PackMLMachine, State
from sorter.drivers.plc.base import PlcCommand

# states in which pieces are ejected into the products
EJECTING = frozenset({State.EXECUTE, State.SUSPENDING, State.SUSPENDED, State.UNSUSPENDING})
# states in which the belt runs with the line producing (a lost PLC link holds these)
PRODUCING = EJECTING | {State.UNHOLDING}
SUPERVISE_S = 0.05
UNHOLD_RETRY_S = 2.0


class PlcPort(Protocol):
    """What the state machine needs of the PLC link (sorter/drivers/plc): its status and its commands."""

    @property
    def status(self) -> PlcStatus: ...

    @property
    def online(self) -> bool: ...

    async def command(self, cmd: PlcCommand, timeout_s: float = ...) -> None: ...


class LineControl:
    """The PackML machine of one line and the work of its acting states.

    It sees only what it needs: the state machine's config, the PLC link, whether the encoder clock
    is locked and every camera delivers, a recorder for its events, and a clock (`now`, monotonic
    seconds: tests drive it by hand).
    """

    def __init__(
        self,
        states: StateMachineConfig,
        plc: PlcPort,
        *,
        clock_ready: Callable[[], bool],
        cameras_online: Callable[[], bool],
        record_event: Callable[..., None],
        log: Any,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.states = states
        self.plc = plc
        self._clock_ready = clock_ready
        self._cameras_online = cameras_online
        self._record_event = record_event
        self.log = log.bind(part="state")
        self._now = now
        self.machine = PackMLMachine(State.STOPPED)
        self.machine.add_listener(self._changed)
        self.listeners: list[Callable[[State, State, str], None]] = []
        self._acting: asyncio.Task[None] | None = None
        self._auto_held = False  # held by the line itself (PLC link lost), lifted by itself
        self._operator_held = False
        self._retry_unhold_at = 0.0
        self._t_activity = now()  # last piece, or entering Execute

    # --- state ---
    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def ejecting(self) -> bool:
        return self.machine.state in EJECTING

    def piece_seen(self) -> None:
        self._t_activity = self._now()

    def _changed(self, old: State, new: State, why: str) -> None:
        self.log.info("state", old=old.label, new=new.label, why=why)
        self._record_event("state", old=old.label, new=new.label, why=why)
        if new is State.EXECUTE:
            self._t_activity = self._now()
            self._auto_held = False  # an automatic hold ends only once the line is producing again
        for fn in self.listeners:
            fn(old, new, why)

    # --- commands ---
    async def command(self, cmd: Command | str, user: str = "local") -> State:
        """Apply a PackML command (raises InvalidState, changing nothing, if the state refuses it)."""
        cmd = Command(cmd)
        self.machine.command(cmd, why=f"{cmd.value} by {user}")
        self.log.info("command", command=cmd.value, user=user, state=self.state.label)
        if cmd is Command.HOLD:
            self._operator_held = True
        elif cmd in (Command.UNHOLD, Command.STOP, Command.ABORT, Command.RESET):
            self._operator_held = self._auto_held = False
        self._begin_acting()
        return self.state

    def _auto(self, cmd: Command, why: str) -> None:
        """A transition the line makes by itself."""
        try:
            self.machine.command(cmd, why=why)
        except InvalidState:
            return
        self._begin_acting()

    def _begin_acting(self) -> None:
        if self._acting is not None and not self._acting.done():
            self._acting.cancel()  # e.g. Abort while Starting: the newer command wins
        st = self.state
        actions: dict[State, Callable[[], Coroutine[Any, Any, None]]] = {
            State.RESETTING: self._reset_plc,
            State.STARTING: self._starting,
            State.UNHOLDING: self._unholding,
            State.STOPPING: self._belt_off,
            State.ABORTING: self._belt_off,
            State.CLEARING: self._clearing,
        }
        if st.acting:
            self._acting = asyncio.create_task(self._act(st, actions.get(st)), name=f"state-{st.label}")

    async def _act(self, st: State, action: Callable[[], Coroutine[Any, Any, None]] | None) -> None:
        try:
            if action is not None:
                await action()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.error(f"ALARM {st.label} failed", error=str(exc))
            self._record_event("alarm", alarm=f"{st.label.lower()}_failed", reason=str(exc))
            if self.state is st:
                if st in (State.STOPPING, State.ABORTING):
                    # the belt could not be commanded (PLC unreachable): the PLC's watchdog makes it safe
                    self.machine.complete(why=f"{st.label} done without the PLC: {exc}")
                elif st is State.CLEARING:
                    self._auto(Command.ABORT, why=f"clearing failed: {exc}")
                elif st is State.UNHOLDING and self._auto_held:
                    # the PLC link dropped again on the way out of Held: stay held, try again later
                    self._retry_unhold_at = self._now() + UNHOLD_RETRY_S
                    self._auto(Command.HOLD, why=f"unholding failed: {exc}")
                else:
                    self._auto(Command.STOP, why=f"{st.label} failed: {exc}")
            return
        if self.state is st:
            self.machine.complete()

    # --- acting states' work ---
    async def _wait_for(self, cond: Callable[[], bool], what: str, deadline: float) -> None:
        while not cond():
            if self._now() > deadline:
                raise TimeoutError(f"{what} not within {self.states.start_timeout_s:g} s")
            await asyncio.sleep(0.05)

    def _plc_ready(self) -> bool:
        return self.plc.online and self._clock_ready()

    async def _reset_plc(self) -> None:
        deadline = self._now() + self.states.start_timeout_s
        await self._wait_for(self._plc_ready, "PLC link", deadline)
        await self.plc.command(PlcCommand.RESET)

    async def _starting(self) -> None:
        plc = self.plc
        deadline = self._now() + self.states.start_timeout_s
        await self._wait_for(self._plc_ready, "PLC link and encoder clock", deadline)
        await plc.command(PlcCommand.RESET)
        await plc.command(PlcCommand.START_BELT)
        await self._wait_for(lambda: plc.status.belt_running, "belt running", deadline)
        # encoder-triggered cameras deliver only once the belt moves
        await self._wait_for(self._cameras_online, "every camera", deadline)
        self.log.info("line started")

    async def _unholding(self) -> None:
        plc = self.plc
        if plc.status.watchdog_tripped or plc.status.queue_overflow:
            await plc.command(PlcCommand.RESET)
        if not plc.status.belt_running:
            await plc.command(PlcCommand.START_BELT)

    async def _belt_off(self) -> None:
        if self.plc.online:
            await self.plc.command(PlcCommand.STOP_BELT, timeout_s=1.0)
        else:
            raise RuntimeError("PLC offline: belt not commanded off")

    async def _clearing(self) -> None:
        if self.plc.status.estop:
            raise RuntimeError("e-stop still pressed")
        await self._reset_plc()

    # --- the line's own conditions ---
    async def supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_S)
            self.check()

    def check(self) -> None:
        """Apply the line's own conditions once (supervise() calls it every SUPERVISE_S)."""
        plc, st, now = self.plc.status, self.state, self._now()
        if plc.online and plc.estop and st not in (State.ABORTING, State.ABORTED, State.CLEARING, State.STOPPED):
            self._auto(Command.ABORT, why="e-stop")
        elif not plc.online and st in PRODUCING:
            self._auto_held = True
            self.log.warning("ALARM PLC link lost: line held, every piece goes to residue", error=plc.last_error)
            self._auto(Command.HOLD, why="PLC link lost")
        elif (plc.watchdog_tripped or plc.queue_overflow) and st in PRODUCING:
            # the PLC takes no command until reset (a link gap too short to notice can trip its
            # watchdog): hold, and Unholding resets it
            self._auto_held = True
            why = "PLC watchdog tripped" if plc.watchdog_tripped else "PLC eject queue overflow"
            self.log.warning(f"ALARM {why}: line held until the PLC is reset")
            self._auto(Command.HOLD, why=why)
        elif (
            st is State.HELD
            and self._auto_held
            and not self._operator_held
            and self._plc_ready()
            and now >= self._retry_unhold_at
        ):
            # _auto_held stays set until Execute: if the link drops again while Unholding, the line goes
            # back to Held and retries, instead of stopping for an operator (seen in a fault run under load)
            self.log.info("PLC link back: unholding")
            self._auto(Command.UNHOLD, why="PLC link back")
        elif st is State.EXECUTE and now - self._t_activity > self.states.starved_after_s:
            self._auto(Command.SUSPEND, why=f"no piece for {self.states.starved_after_s:g} s (feed ran dry)")
        elif st is State.SUSPENDED and now - self._t_activity < SUPERVISE_S * 4:
            self._auto(Command.UNSUSPEND, why="pieces again")

    # --- start and stop with the service ---
    async def start_line(self) -> None:
        """Reset and Start, as an operator would (the service's --start)."""
        with contextlib.suppress(InvalidState):
            await self.command(Command.RESET, user="service")
        await self._settled(State.IDLE)
        if self.state is State.IDLE:
            await self.command(Command.START, user="service")

    async def _settled(self, want: State, timeout: float | None = None) -> None:
        deadline = self._now() + (timeout or self.states.start_timeout_s + 1)
        while self.state.acting and self.state is not want and self._now() < deadline:
            await asyncio.sleep(0.02)

    async def shutdown(self) -> None:
        """Service stopping: Stop the line (belt off) unless it already is stopped or aborted."""
        if self._acting is not None and not self._acting.done():
            self._acting.cancel()
            await asyncio.gather(self._acting, return_exceptions=True)
        if self.state not in (State.STOPPED, State.ABORTED):
            with contextlib.suppress(InvalidState):
                self.machine.command(Command.STOP, why="service stopping")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._belt_off(), 1.5)
                self.machine.complete(why="service stopping")
