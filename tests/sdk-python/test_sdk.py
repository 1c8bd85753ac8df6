"""The official Python SDKs against a real ringcast server.

- centrifuge-python (the client SDK), over JSON and over Protobuf: connect with a JWT, subscribe,
  receive publications made through the HTTP API and by the client itself, presence, history, and exact
  recovery of what was published while a forced reconnect was in progress.
- cent (the HTTP API client): every call shape it sends, checked against what a client observes.
- Two nodes over Redis (127.0.0.1:6379, a key prefix per test): a client on node B receives what node A's
  HTTP API publishes; B is SIGKILLed, the client reconnects (through a forwarder standing for a load
  balancer) to A and recovers exactly what was published meanwhile.

RINGCAST_BIN points at the server binary (scripts/test.sh builds it and runs this file).
"""

import asyncio
import json
import os
import socket
import subprocess
import time
import unittest

import cent
from centrifuge import (
    Client,
    ClientEventHandler,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
)

BIN = os.environ.get("RINGCAST_BIN", "../../target/release/ringcast")
API_KEY = "sdk-python-key"
SECRET = "sdk-python-secret"
T = 5.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tls_dir=None, redis_prefix=None):
        self.port = free_port()
        tls = ["--tls-cert", f"{tls_dir}/cert.pem", "--tls-key", f"{tls_dir}/key.pem"] if tls_dir else []
        redis = ["--broker", "redis", "--redis-url", "redis://127.0.0.1:6379",
                 "--redis-prefix", redis_prefix, "--tcp-listen", "off"] if redis_prefix else []
        self.proc = subprocess.Popen(
            [BIN, "serve", "--dev", "--listen", f"127.0.0.1:{self.port}", "--api-key", API_KEY,
             "--token-hmac-secret-key", SECRET, "--log-level", "warn", *tls, *redis],
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("server did not start")
        scheme = "s" if tls_dir else ""
        self.ws = f"ws{scheme}://127.0.0.1:{self.port}/connection/websocket"
        self.api = cent.Client(f"http{scheme}://127.0.0.1:{self.port}/api", API_KEY, timeout=T)

    def token(self, user):
        out = subprocess.run([BIN, "gentoken", "--user", user, "--secret", SECRET],
                             check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)

    def kill(self):
        """SIGKILL: a crash, no goodbye."""
        self.proc.kill()
        self.proc.wait(10)


class Forwarder:
    """A TCP forwarder standing for a load balancer: each new connection goes to the port in `target`."""

    def __init__(self, target):
        self.target = target

    async def start(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def handle(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:  # the test's loop ends with connections still open
            writer.close()
            up_writer.close()

    def close(self):
        self.server.close()


def decode(data, protobuf):
    """Publication data: JSON values over JSON, raw bytes over Protobuf."""
    return json.loads(data) if protobuf else data


def encode(value, protobuf):
    """What the SDK sends: a JSON value over JSON, bytes (here: JSON text) over Protobuf."""
    return json.dumps(value).encode() if protobuf else value


class Recorder(SubscriptionEventHandler):
    def __init__(self):
        self.publications = []
        self.subscribed = []
        self.changed = asyncio.Event()

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.publications.append(ctx.pub)
        self.changed.set()

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.subscribed.append(ctx)
        self.changed.set()

    async def on_unsubscribed(self, ctx) -> None:
        self.changed.set()

    async def wait(self, pred, what):
        deadline = asyncio.get_running_loop().time() + T
        while not pred():
            self.changed.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                pass


async def subscribed(client, channel, recoverable=False):
    """Connects `client` and subscribes it to `channel`; returns the subscription and its recorder."""
    rec = Recorder()
    sub = client.new_subscription(channel, rec, recoverable=recoverable)
    await client.connect()
    await sub.subscribe()
    await sub.ready(T)
    return sub, rec


class ClientEvents(ClientEventHandler):
    def __init__(self):
        self.connecting = asyncio.Event()
        self.server_subscribed = []
        self.server_publications = []

    async def on_connecting(self, ctx) -> None:
        self.connecting.set()

    async def on_subscribed(self, ctx) -> None:
        self.server_subscribed.append(ctx.channel)

    async def on_publication(self, ctx) -> None:
        self.server_publications.append((ctx.channel, ctx.pub))


class ClientSdk(unittest.IsolatedAsyncioTestCase):
    protobuf = False

    def setUp(self):
        self.server = Server()

    def tearDown(self):
        self.server.stop()

    async def api(self, method, request):
        return await asyncio.to_thread(getattr(self.server.api, method), request)

    def client(self, user, events=None, **kw):
        return Client(self.server.ws, events=events, token=self.server.token(user),
                      use_protobuf=self.protobuf, proxy=None, **kw)

    async def test_publications_presence_and_history(self):
        client = self.client("alice")
        sub, rec = await subscribed(client, "news", recoverable=True)
        try:
            await self.api("publish", cent.PublishRequest(channel="news", data={"n": 1}))
            await sub.publish(encode({"n": 2}, self.protobuf))
            await rec.wait(lambda: len(rec.publications) == 2, "two publications")
            self.assertEqual([decode(p.data, self.protobuf) for p in rec.publications], [{"n": 1}, {"n": 2}])
            self.assertEqual([p.offset for p in rec.publications], [1, 2])
            self.assertIsNone(rec.publications[0].info, "published through the API: no client info")
            self.assertEqual(rec.publications[1].info.user, "alice", "the publisher's identity is attached")

            presence = await sub.presence()
            self.assertEqual([c.user for c in presence.clients.values()], ["alice"])
            stats = await sub.presence_stats()
            self.assertEqual((stats.num_clients, stats.num_users), (1, 1))
            history = await sub.history(limit=10)
            self.assertEqual([decode(p.data, self.protobuf) for p in history.publications], [{"n": 1}, {"n": 2}])
            self.assertEqual(history.offset, 2)
            self.assertTrue(history.epoch)
        finally:
            await client.disconnect()

    async def test_forced_reconnect_recovers_exactly_what_was_missed(self):
        events = ClientEvents()
        client = self.client("bob", events, min_reconnect_delay=0.5, max_reconnect_delay=0.6)
        sub, rec = await subscribed(client, "feed", recoverable=True)
        try:
            await self.api("publish", cent.PublishRequest(channel="feed", data={"n": 1}))
            await rec.wait(lambda: len(rec.publications) == 1, "the first publication")
            events.connecting.clear()
            disconnect = cent.Disconnect(code=3011, reason="force reconnect")
            await self.api("disconnect", cent.DisconnectRequest(user="bob", disconnect=disconnect))
            await asyncio.wait_for(events.connecting.wait(), T)
            for n in (2, 3, 4):  # while the client is away (it waits 0.5 s before reconnecting)
                await self.api("publish", cent.PublishRequest(channel="feed", data={"n": n}))
            await rec.wait(lambda: len(rec.subscribed) == 2 and len(rec.publications) == 4, "recovery")
            self.assertEqual([decode(p.data, self.protobuf) for p in rec.publications],
                             [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}], "exactly once, in order")
            again = rec.subscribed[1]
            self.assertTrue(again.was_recovering)
            self.assertTrue(again.recovered)
        finally:
            await client.disconnect()

    async def test_server_side_subscribe_and_unsubscribe_reach_the_client(self):
        events = ClientEvents()
        client = self.client("carol", events)
        await client.connect()
        await client.ready(T)
        try:
            await self.api("subscribe", cent.SubscribeRequest(user="carol", channel="alerts"))
            deadline = time.monotonic() + T
            while "alerts" not in events.server_subscribed and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            self.assertIn("alerts", events.server_subscribed)
            await self.api("publish", cent.PublishRequest(channel="alerts", data={"level": "high"}))
            while not events.server_publications and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            channel, pub = events.server_publications[0]
            self.assertEqual((channel, decode(pub.data, self.protobuf)), ("alerts", {"level": "high"}))
        finally:
            await client.disconnect()


class ClientSdkProtobuf(ClientSdk):
    protobuf = True


class ClusterSdk(unittest.IsolatedAsyncioTestCase):
    """Two nodes on one Redis and one key prefix (deleted afterwards; never a FLUSH)."""

    def setUp(self):
        self.prefix = f"rc-sdk-python-{os.getpid()}-{int(time.time() * 1000)}"
        self.a = Server(redis_prefix=self.prefix)
        self.b = Server(redis_prefix=self.prefix)

    def tearDown(self):
        self.a.stop()
        self.b.stop()
        keys = subprocess.run(["redis-cli", "--scan", "--pattern", f"{self.prefix}:*"], capture_output=True, text=True)
        for key in keys.stdout.split():
            subprocess.run(["redis-cli", "DEL", key], capture_output=True)

    async def test_a_client_of_a_killed_node_reconnects_to_another_and_recovers(self):
        lb = await Forwarder(self.b.port).start()
        events = ClientEvents()
        client = Client(f"ws://127.0.0.1:{lb.port}/connection/websocket", events=events,
                        token=self.a.token("erin"), proxy=None, min_reconnect_delay=1.0, max_reconnect_delay=1.2)
        sub, rec = await subscribed(client, "feed", recoverable=True)
        try:
            publish = lambda n: asyncio.to_thread(self.a.api.publish, cent.PublishRequest(channel="feed", data={"n": n}))
            await publish(1)
            await rec.wait(lambda: len(rec.publications) == 1, "node A's publication on node B")
            lb.target = self.a.port
            events.connecting.clear()
            self.b.kill()
            await asyncio.wait_for(events.connecting.wait(), T)
            for n in (2, 3, 4):  # while the client moves to A (before or after its resubscribe)
                await publish(n)
            await rec.wait(lambda: len(rec.subscribed) == 2 and len(rec.publications) == 4, "recovery on A")
            self.assertEqual([p.data for p in rec.publications], [{"n": n} for n in (1, 2, 3, 4)],
                             "exactly once, in order")
            self.assertEqual([p.offset for p in rec.publications], [1, 2, 3, 4])
            again = rec.subscribed[1]
            self.assertTrue(again.was_recovering)
            self.assertTrue(again.recovered)
            info = await asyncio.to_thread(self.a.api.info, cent.InfoRequest())
            self.assertEqual(info.nodes[0].num_clients, 1, "the client is on A now")
        finally:
            await client.disconnect()
            lb.close()


class CentApi(unittest.IsolatedAsyncioTestCase):
    def setUp(self):
        self.server = Server()

    def tearDown(self):
        self.server.stop()

    async def test_every_call_shape(self):
        api = self.server.api
        client = Client(self.server.ws, token=self.server.token("dave"), proxy=None)
        sub, rec = await subscribed(client, "room")
        try:
            r = await asyncio.to_thread(api.publish, cent.PublishRequest(channel="room", data={"a": 1}))
            self.assertEqual(r.offset, 1)
            self.assertTrue(r.epoch)
            b = await asyncio.to_thread(api.broadcast, cent.BroadcastRequest(channels=["room", "other"], data={"b": 2}))
            self.assertEqual(len(b.responses), 2)
            self.assertTrue(all(x.error is None for x in b.responses), b)
            await rec.wait(lambda: len(rec.publications) == 2, "publish and broadcast")

            presence = await asyncio.to_thread(api.presence, cent.PresenceRequest(channel="room"))
            self.assertEqual([c.user for c in presence.presence.values()], ["dave"])
            stats = await asyncio.to_thread(api.presence_stats, cent.PresenceStatsRequest(channel="room"))
            self.assertEqual((stats.num_clients, stats.num_users), (1, 1))

            history = await asyncio.to_thread(api.history, cent.HistoryRequest(channel="room", limit=10))
            self.assertEqual([p.data for p in history.publications], [{"a": 1}, {"b": 2}])
            await asyncio.to_thread(api.history_remove, cent.HistoryRemoveRequest(channel="room"))
            history = await asyncio.to_thread(api.history, cent.HistoryRequest(channel="room", limit=10))
            self.assertEqual(history.publications, [])

            channels = await asyncio.to_thread(api.channels, cent.ChannelsRequest())
            self.assertEqual(channels.channels["room"].num_clients, 1)
            info = await asyncio.to_thread(api.info, cent.InfoRequest())
            self.assertEqual(info.nodes[0].num_clients, 1)
            self.assertEqual(info.nodes[0].num_users, 1)

            batch = await asyncio.to_thread(api.batch, cent.BatchRequest(requests=[
                cent.PublishRequest(channel="room", data={"c": 3}),
                cent.PresenceStatsRequest(channel="room"),
            ]))
            self.assertEqual(len(batch.replies), 2)
            await rec.wait(lambda: len(rec.publications) == 3, "the batched publish")

            await asyncio.to_thread(api.unsubscribe, cent.UnsubscribeRequest(user="dave", channel="room"))
            await rec.wait(lambda: sub.state.value == "unsubscribed", "server-side unsubscribe")

            with self.assertRaises(cent.exceptions.CentApiResponseError) as err:
                await asyncio.to_thread(api.history, cent.HistoryRequest(channel="", limit=1))
            self.assertEqual(err.exception.code, 107, "bad request")
            wrong = cent.Client(f"http://127.0.0.1:{self.server.port}/api", "wrong-key", timeout=T)
            with self.assertRaises(cent.exceptions.CentUnauthorizedError):
                await asyncio.to_thread(wrong.info, cent.InfoRequest())
        finally:
            await client.disconnect()


if __name__ == "__main__":
    unittest.main(verbosity=2)


def make_pki(directory):
    """A CA and a leaf for 127.0.0.1, made now with openssl."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)
    run("req", "-x509", *ec, "-days", "2", "-subj", "/CN=sdk-python test CA",
        "-keyout", f"{directory}/ca.key", "-out", f"{directory}/ca.pem")
    run("req", *ec, "-subj", "/CN=localhost", "-keyout", f"{directory}/key.pem", "-out", f"{directory}/leaf.csr")
    with open(f"{directory}/ext", "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", f"{directory}/leaf.csr", "-CA", f"{directory}/ca.pem", "-CAkey", f"{directory}/ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{directory}/ext", "-out", f"{directory}/cert.pem")


class TlsClientSdk(unittest.IsolatedAsyncioTestCase):
    """centrifuge-python over wss:// and cent over https:// (issue 13). Both trust the test CA through
    the standard environment: SSL_CERT_FILE (OpenSSL's default verify paths, which websockets' default
    context loads) and REQUESTS_CA_BUNDLE (requests, under cent)."""

    def setUp(self):
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="ringcast-sdk-python-tls-")
        make_pki(self.dir)
        self.saved = {k: os.environ.get(k) for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")}
        os.environ["SSL_CERT_FILE"] = f"{self.dir}/ca.pem"
        os.environ["REQUESTS_CA_BUNDLE"] = f"{self.dir}/ca.pem"
        self.server = Server(tls_dir=self.dir)

    def tearDown(self):
        self.server.stop()
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)

    async def test_subscribe_over_wss_and_publish_over_https(self):
        self.assertTrue(self.server.ws.startswith("wss://"))
        client = Client(self.server.ws, token=self.server.token("alice"), proxy=None)
        sub, rec = await subscribed(client, "secure")
        try:
            for n in range(1, 4):
                await asyncio.to_thread(self.server.api.publish,
                                        cent.PublishRequest(channel="secure", data={"n": n, "pad": "q" * (400 * n)}))
            await sub.publish({"n": 4})
            await rec.wait(lambda: len(rec.publications) == 4, "four publications over wss")
            self.assertEqual([p.data["n"] for p in rec.publications], [1, 2, 3, 4])
        finally:
            await client.disconnect()
