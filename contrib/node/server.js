// A Node HTTP server written for zdt pass mode (socket activation).
//
//   [program.web]
//   command = ["node", "contrib/node/server.js"]
//   listen = ["tcp://0.0.0.0:9501"]
//   ready = { notify = true }
//   environment = { ZDT_BIN = "/usr/local/bin/zdt" }
//
// - Listens on the socket zdt passes as fd 3 (LISTEN_FDS / LISTEN_PID); in
//   proxy mode on the private address zdt names, $SOCKET (`upstream =
//   "unix"`) or $PORT; on $PORT (default 3000) when run alone.
// - Tells zdt it is ready with `zdt notify READY=1` once listening (Node's
//   dgram module cannot send to unix sockets).
// - Drains lazily on SIGTERM, which is what makes pass mode lose nothing:
//   stop accepting; answer every further request on open connections with
//   `Connection: close`; close a connection only after it has been idle for
//   DRAIN_GRACE_MS. Node >= 19's server.close() closes idle keep-alive
//   connections at once, racing a client that is sending its next request
//   on one (the keep-alive race): that part is switched off here.
'use strict';
const http = require('http');
const { execFile } = require('child_process');

// The release's VERSION file, if it has one (zdt deploys: each generation
// runs in its own release folder).
let version = null;
try {
  version = require('fs').readFileSync(require('path').join(__dirname, 'VERSION'), 'utf8').trim();
} catch (_) { /* no VERSION file */ }

const DRAIN_GRACE_MS = Number(process.env.DRAIN_GRACE_MS || 500);
let draining = false;
const sockets = new Map(); // socket -> { inflight, lastActive }

const server = http.createServer((req, res) => {
  const state = sockets.get(req.socket);
  if (state) state.inflight++;
  res.on('finish', () => {
    if (state) {
      state.inflight--;
      state.lastActive = Date.now();
    }
  });
  const url = new URL(req.url, 'http://localhost');
  const sleep = Number(url.searchParams.get('sleep') || 0);
  setTimeout(() => {
    if (draining) res.setHeader('Connection', 'close');
    res.setHeader('Content-Type', 'application/json');
    res.end(JSON.stringify({
      pid: process.pid,
      generation: Number(process.env.ZDT_GENERATION || 0),
      instance: Number(process.env.ZDT_INSTANCE || 0),
      release: process.env.ZDT_RELEASE || null,
      at: Date.now(), // when the request reached this process (Unix ms)
      version,
      path: url.pathname,
    }));
  }, sleep);
});

server.on('connection', (socket) => {
  sockets.set(socket, { inflight: 0, lastActive: Date.now() });
  socket.on('close', () => sockets.delete(socket));
});

function notify(message) {
  if (!process.env.NOTIFY_SOCKET) return;
  execFile(process.env.ZDT_BIN || 'zdt', ['notify', message], (err) => {
    if (err) console.error(`cannot notify zdt: ${err.message}`);
  });
}

server.on('listening', () => {
  console.log(`node pid=${process.pid} gen=${process.env.ZDT_GENERATION || 0} listening`);
  notify('READY=1');
});

const activated = Number(process.env.LISTEN_PID) === process.pid && Number(process.env.LISTEN_FDS) >= 1;
delete process.env.LISTEN_FDS;
delete process.env.LISTEN_PID;
delete process.env.LISTEN_FDNAMES;
if (activated) {
  server.listen({ fd: 3 });
} else if (process.env.SOCKET) {
  server.listen(process.env.SOCKET);
} else {
  server.listen(Number(process.env.PORT || 3000), '127.0.0.1');
}

function drain() {
  if (draining) return;
  draining = true;
  console.log(`node pid=${process.pid} draining`);
  server.closeIdleConnections = () => {}; // keep idle keep-alive connections for now
  server.close(() => process.exit(0)); // stop accepting; fires when all connections are gone
  setInterval(() => {
    const now = Date.now();
    for (const [socket, s] of sockets) {
      if (s.inflight === 0 && now - s.lastActive >= DRAIN_GRACE_MS) socket.destroy();
    }
  }, 50).unref();
}
process.on('SIGTERM', drain);
process.on('SIGINT', drain);
