"""A tiny WSGI app for bench/servers.sh (gunicorn).

GET /health -> "ok"; GET /?sleep=MS -> waits MS ms, answers {"pid": N}.
"""
import json
import os
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/health":
        body = b"ok\n"
        ctype = "text/plain"
    else:
        q = parse_qs(environ.get("QUERY_STRING", ""))
        ms = min(int(q.get("sleep", ["0"])[0] or 0), 600)
        if ms > 0:
            time.sleep(ms / 1000)
        body = (json.dumps({"pid": os.getpid()}) + "\n").encode()
        ctype = "application/json"
    start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]
