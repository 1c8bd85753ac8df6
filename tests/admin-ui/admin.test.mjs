// The admin dashboard end to end, in headless Chromium (Debian's package, driven by playwright-core):
// log in (a wrong password first), watch the numbers while `ringcast bench fanout` loads the server,
// take a screenshot, and fail if a chart stays empty under load or the numbers do not change.
//
// RINGCAST_BIN: the server binary (scripts/test.sh builds it). CHROMIUM_BIN: /usr/bin/chromium by
// default. ADMIN_SCREENSHOT: where the PNG goes (default target/test-logs/admin-dashboard.png).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import net from 'node:net';
import { chromium } from 'playwright-core';

const BIN = process.env.RINGCAST_BIN ?? '../../target/release/ringcast';
const CHROMIUM = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';
const SCREENSHOT = process.env.ADMIN_SCREENSHOT ?? '../../target/test-logs/admin-dashboard.png';
const PASSWORD = 'dashboard test pw';
// Bounded load: 40 subscribers, 2 publishers, 1,000 messages a second in all, 1 s warm-up + 8 s.
const BENCH = ['--subscribers', '40', '--publishers', '2', '--rate', '1000', '--warmup', '1s', '--duration', '8s', '-q'];
const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

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

async function startServer() {
  const port = await freePort();
  const args = ['serve', '--dev', '--listen', `127.0.0.1:${port}`, '--tcp-listen', 'off',
    '--admin-password', PASSWORD, '--log-level', 'warn'];
  const proc = spawn(BIN, args, { stdio: ['ignore', 'inherit', 'inherit'] });
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

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// What the page shows: the card texts, the snapshot count, and per chart the points it holds and how
// many canvas pixels carry a series colour (the lines actually drawn).
function readPage(page) {
  return page.evaluate(() => {
    const text = (id) => document.getElementById(id).textContent;
    const charts = {};
    for (const canvas of document.querySelectorAll('#charts canvas')) {
      const g = canvas.getContext('2d');
      const { data } = g.getImageData(0, 0, canvas.width, canvas.height);
      let inked = 0;
      for (let i = 0; i < data.length; i += 4) {
        // Grid lines are grey (r≈g≈b); series colours are not.
        const [r, gr, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
        if (a > 0 && Math.max(r, gr, b) - Math.min(r, gr, b) > 40) inked++;
      }
      const series = window.ringcast.series[canvas.id];
      charts[canvas.id] = { inked, positive: series.map((pts) => pts.filter((v) => v != null && v > 0).length) };
    }
    return {
      snapshots: window.ringcast.snapshots,
      cards: Object.fromEntries(['connections', 'subscriptions', 'messages_in', 'messages_out', 'deliveries', 'latency', 'rss', 'cpu'].map((id) => [id, text(id)])),
      charts,
    };
  });
}

test('dashboard: login, live numbers and charts under ringcast bench, screenshot', async () => {
  const { port, proc } = await startServer();
  const userDataDir = mkdtempSync(path.join(os.tmpdir(), 'ringcast-admin-chromium-'));
  let context;
  let bench;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: FLAGS,
      viewport: { width: 1280, height: 630 },
    });
    const page = context.pages()[0] ?? await context.newPage();
    const base = `http://127.0.0.1:${port}`;

    // Without a session: the login form. A wrong password is refused with the form again.
    await page.goto(`${base}/admin`);
    await page.waitForSelector('input[name=password]');
    await page.fill('input[name=password]', 'not the password');
    const [refused] = await Promise.all([page.waitForNavigation(), page.click('#submit')]);
    assert.equal(refused.status(), 401);
    assert.match(await page.textContent('#error'), /Wrong password/);
    assert.equal(await page.$('#charts'), null, 'no dashboard for a wrong password');

    // The right password: the dashboard, live over /admin/ws.
    await page.fill('input[name=password]', PASSWORD);
    await Promise.all([page.waitForNavigation(), page.click('#submit')]);
    await page.waitForSelector('#status.live', { timeout: 10000 });
    await page.waitForFunction(() => window.ringcast.snapshots >= 2, null, { timeout: 10000 });
    const idle = await readPage(page);

    // Load: a bounded fan-out run against the client protocol.
    const started = Date.now();
    bench = spawn(BIN, ['bench', 'fanout', '--url', `ws://127.0.0.1:${port}/connection/websocket`, ...BENCH],
      { stdio: ['ignore', 'ignore', 'inherit'] });
    const benchDone = new Promise((resolve) => bench.on('exit', (code) => resolve(code)));
    const seen = { messages_in: new Set(), messages_out: new Set(), deliveries: new Set(), connections: new Set(), latency: new Set() };
    let loaded = null;
    let shot = false;
    let exited = null;
    benchDone.then((code) => { exited = code; });
    // Sample the page every 500 ms until the run ends (bounded: 40 samples, 20 s).
    for (let i = 0; i < 40 && exited === null; i++) {
      await sleep(500);
      const now = await readPage(page);
      for (const k of Object.keys(seen)) seen[k].add(now.cards[k]);
      loaded = now;
      if (!shot && Date.now() - started > 7000) {
        mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
        await page.screenshot({ path: SCREENSHOT });
        shot = true;
      }
    }
    const timeout = new Promise((r) => setTimeout(() => r('timeout'), 30000).unref());
    const code = await Promise.race([benchDone, timeout]);
    assert.equal(code, 0, 'ringcast bench fanout exits 0');
    assert.ok(shot, 'a screenshot under load');
    console.log('admin: idle', JSON.stringify(idle.cards));
    console.log('admin: under load', JSON.stringify(loaded.cards));
    console.log('admin: charts', JSON.stringify(loaded.charts));
    console.log(`admin: bench ran ${((Date.now() - started) / 1000).toFixed(1)} s; ${loaded.snapshots} snapshots`);

    // The numbers changed while the load ran: connections and latency (bucketed, steady under a steady
    // load) at least from idle to loaded; the rates move from second to second.
    for (const k of Object.keys(seen)) {
      const least = k === 'connections' || k === 'latency' ? 2 : 3;
      assert.ok(seen[k].size >= least, `${k} took ${seen[k].size} values under load: ${[...seen[k]]}`);
    }
    assert.ok(Number(loaded.cards.connections) >= 40, `40 subscribers and 2 publishers counted: ${loaded.cards.connections}`);
    assert.ok(loaded.snapshots > idle.snapshots + 5, 'snapshots kept coming');
    // Every chart has drawn something positive under load, and its line is on the canvas.
    for (const [id, chart] of Object.entries(loaded.charts)) {
      assert.ok(chart.positive.some((n) => n > 0), `${id} stayed empty under load: ${JSON.stringify(chart)}`);
      assert.ok(chart.inked > 20, `${id} drew no line: ${JSON.stringify(chart)}`);
    }
    const messages = loaded.charts.c_messages.positive;
    assert.ok(messages.every((n) => n > 0), `messages in, out and deliveries all charted: ${messages}`);
  } finally {
    if (bench && bench.exitCode === null) bench.kill('SIGKILL');
    if (context) await context.close();
    proc.kill('SIGINT');
    await new Promise((r) => proc.on('exit', r));
    rmSync(userDataDir, { recursive: true, force: true });
  }
});
