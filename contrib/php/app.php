<?php
// A tiny PHP app for `php -S` behind zdt's proxy mode (the router script:
// every request runs this file).
//   GET /health        "ok" (zdt's readiness probe: ready = { http = "/health" })
//   GET /?sleep=MS     waits MS milliseconds, then answers JSON
//   anything else      JSON with the worker's pid, zdt generation and release,
//                      and the VERSION file next to this script (read per
//                      request, after the sleep, as PHP reads its files)
$path = parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH);
if ($path === '/health') {
    header('Content-Type: text/plain');
    echo "ok\n";
    return true;
}
$sleep = isset($_GET['sleep']) ? (int) $_GET['sleep'] : 0;
if ($sleep > 0) {
    usleep(min($sleep, 600000) * 1000);
}
header('Content-Type: application/json');
echo json_encode([
    'pid' => getmypid(),
    'generation' => (int) getenv('ZDT_GENERATION'),
    'instance' => (int) getenv('ZDT_INSTANCE'),
    'release' => getenv('ZDT_RELEASE') ?: null,
    'version' => is_file(__DIR__ . '/VERSION') ? trim(file_get_contents(__DIR__ . '/VERSION')) : null,
    'path' => $path,
]), "\n";
return true;
