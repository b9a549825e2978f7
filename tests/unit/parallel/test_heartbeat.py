"""Waiting for one rank's work alone (parallel/heartbeat.py wait_done): as long as it takes while the rank's heartbeat
moves, a lost peer as soon as it stands still; on torch's own in-process store."""

import threading
import time

import pytest
from torch.distributed import HashStore

from dist_clm.parallel import heartbeat
from dist_clm.parallel.collectives import is_collective_failure
from dist_clm.parallel.heartbeat import Heartbeat, wait_done


def test_a_wait_outlasts_its_allowance_while_the_rank_beats_and_ends_when_it_stops(monkeypatch):
    store = HashStore()
    monkeypatch.setattr(heartbeat, "_store", lambda: store)

    def rank0(seconds):  # beats every 0.1 s, says it is done after `seconds`
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            store.add(Heartbeat.key(0), 1)
            time.sleep(0.1)
        store.set("done", "1")

    worker = threading.Thread(target=rank0, args=(1.5,))
    worker.start()
    start = time.monotonic()
    wait_done("done", 0, silent_s=0.5, poll_s=0.05)  # three times the allowance: rank 0 still beats
    assert time.monotonic() - start >= 1.4
    worker.join()
    start = time.monotonic()
    with pytest.raises(RuntimeError) as lost:  # no beat, no answer: gone after the allowance
        wait_done("never", 0, silent_s=0.5, poll_s=0.05)
    assert 0.5 <= time.monotonic() - start < 2 and is_collective_failure(lost.value)
