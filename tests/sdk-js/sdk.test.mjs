// The official JavaScript SDK (npm `centrifuge`) against a real ringcast server:
// connect, subscribe, receive a publication made through the HTTP API, and recover what was published
// while a forced reconnect was in progress — exactly once, in order.
//
// RINGCAST_BIN points at the server binary (scripts/test.sh builds it).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import net from 'node:net';
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

const BIN = process.env.RINGCAST_BIN ?? '../../target/release/ringcast';
const API_KEY = 'sdk-test-key';

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
    srv.on('error', reject);
  });
}

async function startServer(extraArgs = []) {
  const port = await freePort();
  const args = ['serve', '--dev', '--listen', `127.0.0.1:${port}`, '--api-key', API_KEY, '--log-level', 'warn', ...extraArgs];
  const proc = spawn(BIN, args, {
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  for (let i = 0; i < 100; i++) {
    const up = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => { s.end(); resolve(true); });
      s.on('error', () => resolve(false));
    });
    if (up) return { port, proc };
    await new Promise((r) => setTimeout(r, 50));
  }
  proc.kill();
  throw new Error('server did not start');
}

async function api(port, method, params) {
  const res = await fetch(`http://127.0.0.1:${port}/api/${method}`, {
    method: 'POST',
    headers: { 'X-API-Key': API_KEY, 'Content-Type': 'application/json' },
    body: JSON.stringify(params),
  });
  assert.equal(res.status, 200, `${method}: HTTP ${res.status}`);
  const body = await res.json();
  assert.equal(body.error, undefined, `${method}: ${JSON.stringify(body.error)}`);
  return body.result;
}

function waitFor(pred, what, ms = 5000) {
  return new Promise((resolve, reject) => {
    const start = Date.now();
    const tick = () => {
      const v = pred();
      if (v) return resolve(v);
      if (Date.now() - start > ms) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 10);
    };
    tick();
  });
}

// The SDK's sockets, so a test can see what each one negotiated.
const sockets = [];
class TrackedWebSocket extends WebSocket {
  constructor(...args) {
    super(...args);
    sockets.push(this);
  }
}

// `pad`: a string carried by every publication (long enough, it is sent compressed when negotiated).
async function connectSubscribeReceiveRecover(serverArgs, pad) {
  const { port, proc } = await startServer(serverArgs);
  sockets.length = 0;
  const client = new Centrifuge(`ws://127.0.0.1:${port}/connection/websocket`, {
    websocket: TrackedWebSocket,
    minReconnectDelay: 200,
    maxReconnectDelay: 400,
  });
  try {
    const received = [];
    const subscribedEvents = [];
    const sub = client.newSubscription('news', { recoverable: true });
    sub.on('publication', (ctx) => received.push(ctx.data));
    sub.on('subscribed', (ctx) => subscribedEvents.push(ctx));
    let connects = 0;
    client.on('connected', () => { connects += 1; });
    sub.subscribe();
    client.connect();
    await waitFor(() => subscribedEvents.length === 1, 'subscribed');
    assert.equal(subscribedEvents[0].recoverable, true);

    // A publication made through the server HTTP API reaches the SDK subscriber.
    const r = await api(port, 'publish', { channel: 'news', data: { n: 1, pad } });
    assert.ok(r.offset >= 1, JSON.stringify(r));
    await waitFor(() => received.length === 1, 'first publication');
    assert.deepEqual(received[0], { n: 1, pad });

    // Force a reconnect, publish while the client is away, and expect exact recovery.
    const disconnected = new Promise((resolve) => client.once('connecting', resolve));
    await api(port, 'disconnect', { user: '', disconnect: { code: 3011, reason: 'force reconnect' } });
    await disconnected;
    await api(port, 'publish', { channel: 'news', data: { n: 2, pad } });
    await api(port, 'publish', { channel: 'news', data: { n: 3, pad } });
    await waitFor(() => subscribedEvents.length === 2, 're-subscribed after reconnect');
    const again = subscribedEvents[1];
    assert.equal(again.wasRecovering, true);
    assert.equal(again.recovered, true);
    await waitFor(() => received.length === 3, 'recovered publications');
    assert.deepEqual(received, [{ n: 1, pad }, { n: 2, pad }, { n: 3, pad }]);
    assert.equal(connects, 2);

    // Live publications continue after recovery.
    await api(port, 'publish', { channel: 'news', data: { n: 4, pad } });
    await waitFor(() => received.length === 4, 'live publication after recovery');
    assert.deepEqual(received[3], { n: 4, pad });
    return sockets.map((s) => s.extensions);
  } finally {
    client.disconnect();
    proc.kill('SIGTERM');
  }
}

test('the official JS SDK connects, subscribes, receives and recovers', async () => {
  const extensions = await connectSubscribeReceiveRecover([], 'p');
  assert.ok(extensions.length >= 2, 'a socket per connect');
  assert.ok(extensions.every((e) => e === ''), `compression is off by default: ${extensions}`);
});

test('the same with permessage-deflate negotiated (ws offers it; --compression)', async () => {
  // 300 bytes of padding: above compression_min_size, so every publication is sent compressed.
  const extensions = await connectSubscribeReceiveRecover(['--compression'], 'x'.repeat(300));
  assert.ok(extensions.length >= 2, 'a socket per connect');
  assert.ok(extensions.every((e) => e === 'permessage-deflate'), `negotiated on every socket: ${extensions}`);
});

// TLS (issue 13): a CA and a leaf for 127.0.0.1 made now with openssl; the SDK's WebSocket (ws) and the
// HTTPS API client trust that CA through their standard `ca` option.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import https from 'node:https';

function makePki() {
  const dir = mkdtempSync(join(tmpdir(), 'ringcast-sdk-js-tls-'));
  const run = (...args) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  run('req', '-x509', ...ec, '-days', '2', '-subj', '/CN=sdk-js test CA', '-keyout', join(dir, 'ca.key'), '-out', join(dir, 'ca.pem'));
  run('req', ...ec, '-subj', '/CN=localhost', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'leaf.csr'));
  writeFileSync(join(dir, 'ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\n');
  run('x509', '-req', '-in', join(dir, 'leaf.csr'), '-CA', join(dir, 'ca.pem'), '-CAkey', join(dir, 'ca.key'),
    '-CAcreateserial', '-days', '2', '-extfile', join(dir, 'ext'), '-out', join(dir, 'cert.pem'));
  return { dir, ca: readFileSync(join(dir, 'ca.pem')) };
}

function httpsApi(port, ca, method, params) {
  return new Promise((resolve, reject) => {
    const body = JSON.stringify(params);
    const req = https.request({
      host: '127.0.0.1', port, path: `/api/${method}`, method: 'POST', ca, ALPNProtocols: ['http/1.1'],
      headers: { 'X-API-Key': API_KEY, 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) },
    }, (res) => {
      const alpn = res.socket?.alpnProtocol;
      let text = '';
      res.on('data', (c) => { text += c; });
      res.on('end', () => {
        try {
          assert.equal(res.statusCode, 200, `${method}: HTTP ${res.statusCode}`);
          const parsed = JSON.parse(text);
          assert.equal(parsed.error, undefined, `${method}: ${text}`);
          resolve({ result: parsed.result, alpn });
        } catch (e) { reject(e); }
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

test('the official JS SDK over wss:// (TLS), publications through the API over https://', async () => {
  const pki = makePki();
  const { port, proc } = await startServer(['--tls-cert', join(pki.dir, 'cert.pem'), '--tls-key', join(pki.dir, 'key.pem')]);
  const opened = [];
  class CaWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols, { ca: pki.ca });
      opened.push(this);
    }
  }
  const client = new Centrifuge(`wss://127.0.0.1:${port}/connection/websocket`, { websocket: CaWebSocket });
  try {
    const received = [];
    const sub = client.newSubscription('secure');
    sub.on('publication', (ctx) => received.push(ctx.data));
    let subscribed = false;
    sub.on('subscribed', () => { subscribed = true; });
    sub.subscribe();
    client.connect();
    await waitFor(() => subscribed, 'subscribed over wss');
    for (let n = 1; n <= 3; n++) {
      const { alpn } = await httpsApi(port, pki.ca, 'publish', { channel: 'secure', data: { n, pad: 'z'.repeat(n * 400) } });
      assert.equal(alpn, 'http/1.1');
      await waitFor(() => received.length === n, `publication ${n} over wss`);
    }
    assert.deepEqual(received.map((d) => d.n), [1, 2, 3]);
    assert.ok(opened.length >= 1 && opened[0].url.startsWith('wss://'));
    // The certificate really is checked: without the CA, the SDK's socket is refused.
    const refused = await new Promise((resolve) => {
      const ws = new WebSocket(`wss://127.0.0.1:${port}/connection/websocket`);
      ws.on('open', () => { ws.close(); resolve(false); });
      ws.on('error', (e) => resolve(String(e.code || e.message)));
    });
    assert.ok(refused && /CERT|certificate|SELF_SIGNED|UNABLE/i.test(refused), `untrusted CA must fail: ${refused}`);
  } finally {
    client.disconnect();
    proc.kill('SIGTERM');
    rmSync(pki.dir, { recursive: true, force: true });
  }
});
