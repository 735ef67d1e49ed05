"""udp-echo: echoes every datagram on PORT, prefixed with this instance's address."""

import os
import signal
import socket
import sys

PORT = int(os.environ["PORT"])


def own_address():
    """The address this sandbox's default route leaves from (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))
        return probe.getsockname()[0]
    finally:
        probe.close()


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
instance = own_address()
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", PORT))
print(f"udp-echo instance {instance} listening on udp/{PORT}", flush=True)
while True:
    data, peer = sock.recvfrom(2048)
    print(f"{peer[0]}:{peer[1]} sent {len(data)} bytes", flush=True)
    sock.sendto(instance.encode() + b": " + data, peer)
