#!/usr/bin/env python3
"""bench/restart-share.py - how much of a restart is zdt's own time.

Measures, in one run, with the release build:
  own:  the demo worker's own start time: spawn it directly with a NOTIFY_SOCKET
        of ours and time spawn -> READY=1 (the signal zdt waits on);
  zdt:  `zdtctl restart` of the same worker in pass mode (ready = notify) and the
        "gen N: 1/1 ready in X ms" that zdt reports (restart accepted -> new
        generation ready and switched).
zdt's share = median(zdt) - median(own). Usage: bench/restart-share.py [ROUNDS]
"""
import os, re, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 20

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def own_start(work):
    path = os.path.join(work, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); sock.bind(path); sock.settimeout(10)
    env = dict(os.environ, NOTIFY_SOCKET=path)
    t0 = time.monotonic()
    p = subprocess.Popen([os.path.join(BIN, "zdt-demo"), "--port", str(free_port())], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while b"READY=1" not in sock.recv(4096):
        pass
    ms = (time.monotonic() - t0) * 1000
    p.terminate(); p.wait(); sock.close(); os.unlink(path)
    return ms

def main():
    if not os.access(os.path.join(BIN, "zdt"), os.X_OK):
        sys.exit("build first: cargo build --release")
    work = tempfile.mkdtemp(prefix="zdt-bench-share.")
    own = [own_start(work) for _ in range(ROUNDS)]
    conf = os.path.join(work, "supervisor.toml")
    with open(conf, "w") as f:
        f.write(f'[supervisor]\ncontrol = "zdt.sock"\nlog_dir = "logs"\n\n[program.demo]\n'
                f'command = ["{BIN}/zdt-demo"]\nlisten = ["tcp://127.0.0.1:{free_port()}"]\n'
                f'ready = {{ notify = true }}\n')
    zdt = subprocess.Popen([os.path.join(BIN, "zdt"), "-c", conf], stderr=subprocess.DEVNULL)
    ctl = [os.path.join(BIN, "zdtctl"), "-c", conf]
    try:
        deadline = time.monotonic() + 20
        while b"RUNNING" not in subprocess.run(ctl + ["status"], capture_output=True).stdout:
            if time.monotonic() > deadline:
                sys.exit("zdt did not start the demo")
            time.sleep(0.05)
        ready, total = [], []
        for _ in range(ROUNDS):
            t0 = time.monotonic()
            out = subprocess.run(ctl + ["restart", "demo"], capture_output=True, text=True, timeout=60)
            total.append((time.monotonic() - t0) * 1000)
            m = re.search(r"ready in ([0-9.]+) ms", out.stdout)
            if out.returncode != 0 or not m:
                sys.exit(f"restart failed: {out.stdout} {out.stderr}")
            ready.append(float(m.group(1)))
    finally:
        subprocess.run(ctl + ["shutdown"], capture_output=True)
        zdt.wait(timeout=30)
    med = statistics.median
    print(f"{ROUNDS} rounds, demo worker, ready = notify")
    print(f"{'worker own start (spawn -> READY=1)':44} median {med(own):7.2f} ms")
    print(f"{'zdt restart -> new generation ready':44} median {med(ready):7.2f} ms (whole zdtctl call {med(total):.1f} ms, includes the old generation's drain)")
    print(f"zdt's share: {med(ready) - med(own):.2f} ms")
    print(f"RESULT own_ms={med(own):.2f} zdt_ready_ms={med(ready):.2f} share_ms={med(ready) - med(own):.2f}")

main()
