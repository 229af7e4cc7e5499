"""Several hosts, one model: `jax.distributed` processes driven by one controller.

JAX runs multi-host programs SPMD: every process must launch the same jitted step, in the same
order, with the same inputs. Only process 0 (the leader) runs the scheduler, the server and the
host side of each step; it sends every launch — the step's padded numpy inputs and which earlier
launch's tokens it reads — to the other processes (followers), which launch it too and keep its
outputs for the launches that read them. The channel is `multiprocessing.connection` over TCP
on the port after the coordinator's (`--dist-init-addr host:port` -> host:port+1).

    node 0: python -m jaxsgl.launch_server --tp-size 4 --nnodes 2 --node-rank 0 \\
                --dist-init-addr 10.0.0.1:5000 ...      # serves HTTP
    node 1: python -m jaxsgl.launch_server --tp-size 4 --nnodes 2 --node-rank 1 \\
                --dist-init-addr 10.0.0.1:5000 ...      # follows node 0
"""

from __future__ import annotations

import logging
import time
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import jax
import numpy as np

logger = logging.getLogger(__name__)

AUTHKEY = b"jaxsgl-followers"  # a handshake check between our own processes, not a secret
KEPT_LAUNCHES = 4  # a follower keeps this many recent launches' outputs (placeholders read one)


def init_distributed(nnodes: int, node_rank: int, dist_init_addr: str | None) -> None:
    """Join the `nnodes` processes (call before anything touches a JAX device)."""
    if nnodes <= 1:
        return
    if dist_init_addr is None:
        raise ValueError("--nnodes > 1 needs --dist-init-addr host:port")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank {node_rank} is not in [0, {nnodes})")
    # Collectives between processes' CPU devices (tests, CPU hosts); GPUs use NCCL regardless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(dist_init_addr, num_processes=nnodes, process_id=node_rank)
    logger.info("process %d of %d: %d local devices", node_rank, nnodes, jax.local_device_count())


def shutdown_distributed(nnodes: int) -> None:
    """Leave the group together (every process calls this; rank 0 holds the coordinator, so
    leaving alone would fail the others)."""
    if nnodes > 1:
        jax.distributed.shutdown()


def channel_address(dist_init_addr: str) -> tuple[str, int]:
    host, port = dist_init_addr.rsplit(":", 1)
    return host, int(port) + 1


def to_host(x: jax.Array | np.ndarray) -> np.ndarray:
    """A replicated array's value, also when it spans other processes' devices."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


class Followers:
    """The leader's end: accepts every follower, then sends each launch to all of them."""

    def __init__(self, dist_init_addr: str, num_followers: int, timeout: float = 600.0):
        address = channel_address(dist_init_addr)
        self._listener = Listener(("0.0.0.0", address[1]), authkey=AUTHKEY)
        self._conns: list[Connection] = []
        deadline = time.monotonic() + timeout
        while len(self._conns) < num_followers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self._conns)} of {num_followers} followers came")
            self._conns.append(self._listener.accept())
        logger.info("%d followers connected", num_followers)

    def send(self, message: Any) -> None:
        for conn in self._conns:
            conn.send(message)

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("stop",))
                conn.close()
            except OSError:
                pass
        self._listener.close()


def connect_to_leader(dist_init_addr: str, timeout: float = 600.0) -> Connection:
    """The follower's end (the leader may still be loading its model: retry)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(channel_address(dist_init_addr), authkey=AUTHKEY)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def follow(runner, conn: Connection) -> int:
    """Launch what the leader launches until it stops; returns the launches run."""
    outputs: dict[int, Any] = {}
    n = 0
    while True:
        try:
            message = conn.recv()
        except EOFError:
            logger.warning("the leader went away")
            return n
        if message[0] == "stop":
            return n
        _, seq, step, prev_seq = message
        pending = runner.launch(step, outputs.get(prev_seq) if prev_seq is not None else None)
        outputs[seq] = pending
        outputs.pop(seq - KEPT_LAUNCHES, None)
        n += 1
