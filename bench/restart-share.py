#!/usr/bin/env python3
"""bench/restart-share.py - how much of a restart is zdt's own time.

For each case (backend:mode), with the release build, in one run:
  own:  the app's own start: the script spawns it directly and times spawn ->
        ready, by the signal zdt waits on in that case: READY=1 on a
        NOTIFY_SOCKET of the script's (pass mode, ready = notify), or the
        first 2xx of its health path, polled every 0.5 ms (proxy mode,
        ready = { http = PATH }, which zdt probes on the private port);
  zdt:  `zdtctl restart` of the same app under zdt, and the "gen N: 1/1
        ready in X ms" zdt reports (restart accepted -> new generation ready;
        the switch follows at once).
zdt's share = median(zdt) - median(own): spawning through zdt's exec shim,
noticing readiness, and the switch.

Cases: demo:pass demo:proxy node:pass node:proxy php:proxy (demo = zdt-demo,
node = contrib/node/server.js, php = php -S with PHP_CLI_SERVER_WORKERS=4 and
contrib/php/app.php). Cases whose program is not installed are skipped.

Usage: bench/restart-share.py [ROUNDS] [--cases CASE,CASE...]
"""
import os, re, shutil, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
NODE_APP = os.path.join(ROOT, "contrib", "node", "server.js")
PHP_APP = os.path.join(ROOT, "contrib", "php", "app.php")
ALL = ["demo:pass", "demo:proxy", "node:pass", "node:proxy", "php:proxy"]


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def app(backend, port):
    """(argv, env, health path) to run BACKEND on PORT by itself."""
    env = dict(os.environ, PORT=str(port), ZDT_BIN=os.path.join(BIN, "zdt"))
    if backend == "demo":
        return [os.path.join(BIN, "zdt-demo"), "--port", str(port)], env, "/health"
    if backend == "node":
        return ["node", NODE_APP], env, "/"
    env["PHP_CLI_SERVER_WORKERS"] = "4"
    return ["php", "-S", f"127.0.0.1:{port}", PHP_APP], env, "/health"


def answers_2xx(port, path):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return s.recv(12)[9:10] == b"2"
    except OSError:
        return False


def own_start(work, backend, mode):
    port = free_port()
    argv, env, path = app(backend, port)
    sock = None
    if mode == "pass":
        npath = os.path.join(work, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); sock.bind(npath); sock.settimeout(10)
        env["NOTIFY_SOCKET"] = npath
    t0 = time.monotonic()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        if sock:
            while b"READY=1" not in sock.recv(4096):
                pass
        else:
            deadline = t0 + 20
            while not answers_2xx(port, path):
                if time.monotonic() > deadline:
                    sys.exit(f"{backend} did not answer on {port}")
                time.sleep(0.0005)
        return (time.monotonic() - t0) * 1000
    finally:
        os.killpg(p.pid, 15); p.wait()
        if sock:
            sock.close(); os.unlink(env["NOTIFY_SOCKET"])


def zdt_config(work, backend, mode):
    argv, env, path = app(backend, "{port}")
    if backend == "demo":
        argv = argv[:1]  # pass: fd 3; proxy: $PORT
    if mode == "pass":
        ready = "{ notify = true }"
    else:
        ready = f'{{ http = "{path}" }}'
    extra = {k: env[k] for k in ("ZDT_BIN", "PHP_CLI_SERVER_WORKERS") if k in env}
    envs = ", ".join(f'{k} = "{v}"' for k, v in extra.items())
    quoted = ", ".join(f'"{a}"' for a in argv)
    conf = os.path.join(work, "supervisor.toml")
    with open(conf, "w") as f:
        f.write(f'[supervisor]\ncontrol = "zdt.sock"\nlog_dir = "logs"\n\n[program.app]\n'
                f'command = [{quoted}]\nlisten = ["tcp://127.0.0.1:{free_port()}"]\n'
                f'mode = "{mode}"\nready = {ready}\nenvironment = {{ {envs} }}\n')
    return conf


def zdt_restarts(work, backend, mode, rounds):
    conf = zdt_config(work, backend, mode)
    zdt = subprocess.Popen([os.path.join(BIN, "zdt"), "-c", conf], stderr=subprocess.DEVNULL)
    ctl = [os.path.join(BIN, "zdtctl"), "-c", conf]
    ready, total = [], []
    try:
        deadline = time.monotonic() + 20
        while b"RUNNING" not in subprocess.run(ctl + ["status"], capture_output=True).stdout:
            if time.monotonic() > deadline:
                sys.exit(f"zdt did not start {backend} ({mode})")
            time.sleep(0.05)
        for _ in range(rounds):
            t0 = time.monotonic()
            out = subprocess.run(ctl + ["restart", "app"], capture_output=True, text=True, timeout=60)
            total.append((time.monotonic() - t0) * 1000)
            m = re.search(r"ready in ([0-9.]+) ms", out.stdout)
            if out.returncode != 0 or not m:
                sys.exit(f"restart failed: {out.stdout} {out.stderr}")
            ready.append(float(m.group(1)))
    finally:
        subprocess.run(ctl + ["shutdown"], capture_output=True)
        zdt.wait(timeout=60)
    return ready, total


def main():
    args = sys.argv[1:]
    rounds, cases = 20, ALL
    while args:
        a = args.pop(0)
        if a == "--cases" and args:
            cases = args.pop(0).split(",")
        elif a.isdigit():
            rounds = int(a)
        else:
            sys.exit(__doc__)
    if not os.access(os.path.join(BIN, "zdt"), os.X_OK):
        sys.exit("build first: cargo build --release")
    med = statistics.median
    print(f"{rounds} restarts per case; medians in ms")
    print(f"{'case':12} {'ready by':16} {'app own start':>14} {'zdt: restart -> ready':>22} {'zdt share':>10} {'whole zdtctl call':>18}")
    results = []
    for case in cases:
        backend, _, mode = case.partition(":")
        if backend not in ("demo", "node", "php") or mode not in ("pass", "proxy") or case == "php:pass":
            sys.exit(f"unknown case {case} (known: {', '.join(ALL)})")
        if backend in ("node", "php") and not shutil.which(backend):
            print(f"{case:12} skipped: {backend} not installed")
            continue
        work = tempfile.mkdtemp(prefix="zdt-bench-share.")
        own = [own_start(work, backend, mode) for _ in range(rounds)]
        ready, total = zdt_restarts(work, backend, mode, rounds)
        share = med(ready) - med(own)
        how = "notify" if mode == "pass" else "http probe"
        print(f"{case:12} {how:16} {med(own):14.2f} {med(ready):22.2f} {share:10.2f} {med(total):18.1f}")
        results.append(f"{case}={share:.2f}")
        shutil.rmtree(work, ignore_errors=True)
    print("(the whole zdtctl call also waits for the old generation to exit)")
    print("RESULT share_ms " + " ".join(results))


main()
