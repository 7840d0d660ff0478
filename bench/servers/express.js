// A tiny Express app for bench/servers.sh.
//   GET /health -> "ok"; GET /?sleep=MS -> waits MS ms, answers {"pid": N}.
// Listens on the socket zdt passes (fd 3) when LISTEN_FDS is set (pass mode),
// else on PORT (proxy mode). Graceful stop as Express's guide shows it
// ("Health checks and graceful shutdown"): SIGTERM -> server.close().
const express = require('express');

const app = express();
app.get('/health', (req, res) => res.type('text').send('ok\n'));
app.get('/', (req, res) => {
  const ms = Math.min(parseInt(req.query.sleep, 10) || 0, 600);
  setTimeout(() => res.json({ pid: process.pid }), ms);
});

const server = process.env.LISTEN_FDS
  ? app.listen({ fd: 3 })
  : app.listen(process.env.PORT, '127.0.0.1');

process.on('SIGTERM', () => {
  server.close(() => {
    console.log('HTTP server closed');
  });
});
