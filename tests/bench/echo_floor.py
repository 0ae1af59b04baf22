"""The latency floor of this machine: a 64-byte TCP round trip on loopback to a server that
sleeps in recv() between requests 1 ms apart (as a broker at 1,000 msg/s does), measured by
a client that busy-polls. A broker's one-way latency cannot go below the wake-up of its idle
core, which is most of this figure. Prints {"rtt_us": {"p50": .., "p99": ..}}.

    taskset -c 0 python3 echo_floor.py server PORT &
    taskset -c 1 python3 echo_floor.py client PORT
"""
import json
import socket
import sys
import time

port = int(sys.argv[2])
if sys.argv[1] == 'server':
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', port)); s.listen(1)
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(64)
        if not d: break
        c.sendall(d)
else:
    c = socket.create_connection(('127.0.0.1', port)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); c.setblocking(False)
    rtts = []
    for i in range(2000):
        t0 = time.perf_counter_ns(); c.send(b'x' * 64)
        got = 0
        while got < 64:
            try: got += len(c.recv(64))
            except BlockingIOError: pass
        rtts.append((time.perf_counter_ns() - t0) / 1000)
        t1 = time.perf_counter_ns()
        while time.perf_counter_ns() - t1 < 1_000_000: pass   # 1 ms gap: the server goes idle
    rtts.sort()
    print(json.dumps({"rtt_us": {"p50": round(rtts[len(rtts) // 2]), "p99": round(rtts[int(len(rtts) * 0.99)])}}))
