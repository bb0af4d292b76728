"""The preemption notice: its handlers only note the first signal, and are put back when training ends."""

import os
import signal

from lisa_dist.config import PreemptConfig
from lisa_dist.preempt import PreemptionNotice


def test_the_first_signal_is_noted_later_ones_change_nothing_and_the_handlers_are_put_back():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    notice = PreemptionNotice(PreemptConfig(signals=["SIGTERM", "SIGUSR1"], exit_code=42))
    with notice:
        assert notice.received == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs before os.kill returns to the interpreter
        assert notice.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # would end the process without the handler
        assert notice.received == signal.SIGUSR1
    assert notice.exit_code == 42
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_no_signals_installs_no_handler():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionNotice(PreemptConfig(signals=[])) as notice:
        assert signal.getsignal(signal.SIGTERM) is before and notice.signals == []
