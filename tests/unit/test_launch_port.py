"""The port an MPI or single-process run's rank 0 picks: free, and below the ephemeral range
where outgoing connections take their local ports (hpcdl.launch._free_port)."""

from __future__ import annotations

import random
import socket

from hpcdl import launch
from hpcdl.rendezvous import EPHEMERAL_LOW, PORT_LOW


def test_the_port_is_below_the_ephemeral_range_and_free():
    for _ in range(20):
        port = launch._free_port()
        assert PORT_LOW <= port < EPHEMERAL_LOW, port
        with socket.socket() as s:
            s.bind(("", port))  # still free: nothing of ours holds it


def test_a_port_in_use_is_passed_over(monkeypatch):
    with socket.socket() as held:
        held.bind(("", 0))
        taken = held.getsockname()[1]
        held.listen()
        given = []

        class Picks(random.SystemRandom):
            def randrange(self, *args, **kwargs):  # type: ignore[override]
                port = taken if len(given) < 2 else super().randrange(*args, **kwargs)
                given.append(port)
                return port

        monkeypatch.setattr(launch.random, "SystemRandom", Picks)
        port = launch._free_port()
        assert given[:2] == [taken, taken] and port == given[-1] != taken
        assert PORT_LOW <= port < EPHEMERAL_LOW
