"""A userspace network link emulator: TUN device pairs with delay and loss (the part of netem we need).

    python bench/link_emulator.py NAME_A:NAME_B [NAME_A:NAME_B ...]

Run by bench/network_hosts.py, as root. For each pair it creates two TUN devices and copies every
IP packet read from one into the other, after `delay` seconds and unless dropped with probability
`loss`, each direction on its own (so 1 ms of delay per link is 2 ms of round trip, and 0.5% loss is
0.5% of the packets each way, as `tc qdisc add ... netem delay 1ms loss 0.5%` on both ends of a veth
would do). The caller then moves one device of each pair into a network namespace and gives both
addresses: the pair is a point-to-point cable whose far end is in another host.

Why not netem: the kernels this runs on do not all have it (a Firecracker guest kernel without
sch_netem, and without tc classifiers, answered "Specified qdisc kind is unknown"), while TUN is
everywhere containers and VMs run. The cost is one Python process in the packet path: about 50-100 us
per packet on top of the configured delay, in the 0 ms baseline too.

The devices are not persistent: they vanish when this process exits, and it exits when its parent
does (PR_SET_PDEATHSIG), so a killed run leaves no link behind. Packets queued for later are simply
dropped then, as a cut cable would.

Control, one command a line on stdin (answered "ok" or "error: ..." on stdout):
    set INDEX DELAY_S LOSS    link INDEX (0-based, in argument order) from now on
Standard library only: the script runs from its path, with no package on sys.path.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import random
import signal
import struct
import sys
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
PR_SET_PDEATHSIG = 1
MAX_PACKET = 65536


def open_tun(name: str) -> int:
    """A new (non-persistent) TUN device `name`, without packet-information headers."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


@dataclass
class Link:
    """One emulated cable between two TUN devices."""

    a: int
    b: int
    delay: float = 0.0
    loss: float = 0.0


class Emulator:
    def __init__(self, links: list[Link]) -> None:
        self.links = links
        self.loop = asyncio.get_running_loop()
        self.rng = random.Random()

    def start(self) -> None:
        for link in self.links:
            self.loop.add_reader(link.a, self._pump, link, link.a, link.b)
            self.loop.add_reader(link.b, self._pump, link, link.b, link.a)

    def _pump(self, link: Link, source: int, target: int) -> None:
        """Every packet waiting on `source`, to `target` after the link's delay, unless lost."""
        while True:
            try:
                packet = os.read(source, MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                return  # the device went down or away: nothing to read now
            if link.loss and self.rng.random() < link.loss:
                continue
            if link.delay > 0:
                self.loop.call_later(link.delay, _write, target, packet)
            else:
                _write(target, packet)


def _write(fd: int, packet: bytes) -> None:
    try:
        os.write(fd, packet)
    except OSError:
        pass  # the far device is down (a partition by `ip link set down`) or full: the packet is lost


async def control(emulator: Emulator) -> None:
    reader = asyncio.StreamReader()
    await emulator.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        words = line.decode().split()
        try:
            if len(words) != 4 or words[0] != "set":
                raise ValueError(f"unknown command {line.decode().strip()!r}")
            link = emulator.links[int(words[1])]
            delay, loss = float(words[2]), float(words[3])
            if delay < 0 or not 0 <= loss <= 1:
                raise ValueError("delay must be >= 0 and loss in [0, 1]")
            link.delay, link.loss = delay, loss
            answer = "ok"
        except (ValueError, IndexError) as exc:
            answer = f"error: {exc}"
        print(answer, flush=True)


async def main(pairs: list[str]) -> None:
    links = []
    for pair in pairs:
        name_a, name_b = pair.split(":")
        links.append(Link(open_tun(name_a), open_tun(name_b)))
    emulator = Emulator(links)
    emulator.start()
    print("ready", flush=True)
    await control(emulator)  # stdin closed: the parent is done with us


if __name__ == "__main__":
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        sys.exit(1)  # the parent died before the prctl: nobody will stop us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(main(sys.argv[1:]))
