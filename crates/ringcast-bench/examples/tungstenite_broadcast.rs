//! A plain tokio-tungstenite broadcast server: the peer that `ringcast bench fanout --protocol raw` is run
//! against in BENCHMARKS.md, side by side with ringcast in the same session, so that figures measured on
//! different days (and machines) can be compared as ratios.
//!
//! It is written the way such servers usually are: one task per connection, one `tokio::sync::broadcast`
//! channel for everyone, every text or binary message a client sends goes to every client (the sender
//! too; the bench's publishers discard what they receive), one `send` (write + flush) per message.
//!
//! ```sh
//! cargo run --release -p ringcast-bench --example tungstenite_broadcast -- 127.0.0.1:9300
//! ringcast bench fanout --url ws://127.0.0.1:9300/ --protocol raw --subscribers 1000 --rate 100 ...
//! ```

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9300".to_string());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("tokio-tungstenite broadcast server on {addr}");
    let (everyone, _) = broadcast::channel::<Message>(4096);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let everyone = everyone.clone();
        tokio::spawn(async move {
            let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
            let (mut sink, mut source) = ws.split();
            let mut inbox = everyone.subscribe();
            loop {
                tokio::select! {
                    from_client = source.next() => match from_client {
                        Some(Ok(m)) if m.is_text() || m.is_binary() => {
                            let _ = everyone.send(m);
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                    to_client = inbox.recv() => match to_client {
                        Ok(m) => {
                            if sink.send(m).await.is_err() {
                                break;
                            }
                        }
                        // Dropped messages show up as loss in the bench's report.
                        Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => break,
                    },
                }
            }
        });
    }
}
