"""A peer that accepts connections and never reads or answers: bench/run.sh's hanging traffic copy.

    python3 bench/hang.py PORT
"""

import socket
import sys

listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(1024)
held = []
while True:
    conn, _ = listener.accept()
    held.append(conn)
