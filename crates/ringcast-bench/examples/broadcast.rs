//! A minimal WebSocket broadcast server, to try `ringcast bench fanout --protocol raw` before ringcast
//! itself can fan out: every message received on a connection is sent to every other connection.
//!
//! It is deliberately naive (tokio-tungstenite, one unbounded queue per connection) — a target to point
//! the generator at, not a benchmark of anything.
//!
//! ```text
//! cargo run --release -p ringcast-bench --example broadcast -- 127.0.0.1:9000
//! ringcast bench fanout --url ws://127.0.0.1:9000/ --subscribers 100 --publishers 2 --rate 10000
//! ```

use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

type Peers = Vec<(u64, mpsc::UnboundedSender<Message>)>;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9000".into());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("broadcasting on ws://{}/", listener.local_addr()?);
    let peers: Arc<Mutex<Peers>> = Arc::default();
    let mut next_id = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let id = next_id;
        next_id += 1;
        let peers = peers.clone();
        tokio::spawn(async move {
            let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
            let (mut sink, mut source) = ws.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
            lock(&peers).push((id, tx));
            tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    if sink.send(m).await.is_err() {
                        break;
                    }
                }
            });
            while let Some(Ok(msg)) = source.next().await {
                if msg.is_binary() || msg.is_text() {
                    for (peer, tx) in lock(&peers).iter() {
                        if *peer != id {
                            let _ = tx.send(msg.clone());
                        }
                    }
                }
            }
            lock(&peers).retain(|(p, _)| *p != id);
        });
    }
}

fn lock(m: &Mutex<Peers>) -> std::sync::MutexGuard<'_, Peers> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
