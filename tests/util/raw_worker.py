# A worker for the proxy tests that answers the way real servers sometimes
# do and zdt-demo (hyper) never does: bodies ended by closing the connection,
# chunked bodies with trailers, hop-by-hop headers, interim 103 responses,
# and keep-alive connections closed without a word. Listens on $PORT.
#
#   /echo      200, the request's header lines and body back as text
#   /eof       200 without a length, ended by closing the connection
#   /chunked   200 chunked, with a trailer
#   /hop       200 with Connection-named and other hop-by-hop headers
#   /early     103 Early Hints, then 200
#   /silent    200 with a length, then the connection is closed unannounced
#   /die       the connection is closed without an answer
#   /badchunk  200 chunked, with a broken chunk size
#   /early413  413 at once, without reading the request body, and the
#              connection held open (not read) for 30 s
#   /hint      103 Early Hints before reading the body, then 200 with the
#              number of body bytes
#   /stream    200 chunked at once, then each piece of the (Content-Length)
#              body echoed as a chunk as it is read
#   /many      200 with 150 headers
#   /deaf      200, then the worker closes every connection and stops
#              listening (new connections are refused), and lives on
import os
import socket
import threading
import time


def read_request(f):
    line = f.readline()
    while line in (b"\r\n", b"\n"):
        line = f.readline()
    if not line:
        return None
    method, target, _ = line.decode().split(" ", 2)
    headers = []
    while True:
        h = f.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        name, value = h.decode().split(":", 1)
        headers.append((name.strip(), value.strip()))
    lower = {k.lower(): v for k, v in headers}
    body = b""
    if target in ("/early413", "/stream"):
        return method, target, headers, f
    if target == "/hint":
        return method, target, headers, (lower, f)
    if lower.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            body += f.read(size)
            f.readline()
    elif "content-length" in lower:
        body = f.read(int(lower["content-length"]))
    return method, target, headers, body


LISTENER = socket.socket()
CONNS = set()


def respond(conn, method, target, headers, body):
    """Answers one request; returns False when the connection is to close."""
    if target == "/deaf":
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndeaf")
        # Wakes the accept below with an error and refuses what comes next.
        LISTENER.shutdown(socket.SHUT_RDWR)
        for c in list(CONNS):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return False
    if target == "/eof":
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nclose-delimited")
        return False
    if target == "/eof-pieces":
        # A close-delimited body in three pieces, the last after a pause,
        # then the close after another.
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nfirst,")
        conn.sendall(b"second,")
        time.sleep(0.05)
        conn.sendall(b"third")
        time.sleep(0.05)
        return False
    if target == "/chunked":
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
        )
        return True
    if target == "/hop":
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret, Content-Length\r\nX-Secret: 1\r\n"
            b"Keep-Alive: timeout=5\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\nok"
        )
        return True
    if target == "/early":
        conn.sendall(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlater"
        )
        return True
    if target == "/hint":
        lower, f = body
        conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
        n = len(f.read(int(lower["content-length"])))
        data = f"received {n}".encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        return True
    if target == "/stream":
        f = body
        left = int({k.lower(): v for k, v in headers}["content-length"])
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while left > 0:
            piece = f.read1(min(left, 65536))
            if not piece:
                return False
            left -= len(piece)
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.sendall(b"0\r\n\r\n")
        return True
    if target == "/many":
        many = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(150))
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + many + b"Content-Length: 4\r\n\r\nmany")
        return True
    if target == "/die":
        return False
    if target == "/badchunk":
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        return True
    if target == "/early413":
        conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        time.sleep(30)
        return False
    if target == "/silent":
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsilent")
        return False
    text = "".join(f"{k}: {v}\n" for k, v in headers) + "body=" + body.decode()
    data = text.encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode()
    conn.sendall(head if method == "HEAD" else head + data)
    return True


def serve(conn):
    CONNS.add(conn)
    f = conn.makefile("rb")
    try:
        while True:
            req = read_request(f)
            if req is None or not respond(conn, *req):
                break
    except (OSError, ValueError):
        pass
    finally:
        CONNS.discard(conn)
        f.close()
        conn.close()


def main():
    s = LISTENER
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(os.environ["PORT"])))
    s.listen(128)
    while True:
        try:
            conn, _ = s.accept()
        except OSError:
            # Deaf (/deaf): live on until stopped.
            while True:
                time.sleep(60)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


main()
