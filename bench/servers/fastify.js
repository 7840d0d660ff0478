// A tiny Fastify app for bench/servers.sh.
//   GET /health -> "ok"; GET /?sleep=MS -> waits MS ms, answers {"pid": N}.
// Pass mode (LISTEN_FDS set): fastify.listen() cannot take an fd, so a node
// http server built by `serverFactory` runs fastify's handler and listens on
// fd 3. Proxy mode: fastify.listen() on PORT. Graceful stop as Fastify's docs
// show it: SIGTERM -> fastify.close() (which closes the server it listened on;
// in pass mode the server is ours, so we close it too).
const http = require('http');
const Fastify = require('fastify');

let server;
const fastify = Fastify({
  serverFactory: (handler) => {
    server = http.createServer(handler);
    return server;
  },
});
fastify.get('/health', async (req, reply) => {
  reply.type('text/plain');
  return 'ok\n';
});
fastify.get('/', async (req) => {
  const ms = Math.min(parseInt(req.query.sleep, 10) || 0, 600);
  if (ms > 0) await new Promise((r) => setTimeout(r, ms));
  return { pid: process.pid };
});

async function main() {
  if (process.env.LISTEN_FDS) {
    await fastify.ready();
    server.listen({ fd: 3 });
  } else {
    await fastify.listen({ port: Number(process.env.PORT), host: '127.0.0.1' });
  }
}
main().catch((err) => {
  console.error(err);
  process.exit(1);
});

process.on('SIGTERM', async () => {
  await fastify.close();
  if (server.listening) server.close();
});
