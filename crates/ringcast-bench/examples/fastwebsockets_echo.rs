//! A fastwebsockets echo server: the echo peer that `ringcast bench echo --compare` is run against
//! (scripts/bench-peers.sh), side by side with ringcast's `/echo` in the same run.
//!
//! It is fastwebsockets' own `echo_server` example (hyper 1 upgrade, one task per connection, every text
//! or binary frame written straight back, pings answered by the library) with three changes: it listens
//! on the loopback address and port given as the first argument, it sets `TCP_NODELAY` as ringcast does,
//! and the runtime has 2 worker threads like ringcast's default (the second argument; `1` runs a
//! current-thread runtime, as the upstream example does).
//!
//! ```sh
//! cargo run --release -p ringcast-bench --example fastwebsockets_echo -- 127.0.0.1:9400 [WORKERS]
//! ringcast bench echo --url ws://127.0.0.1:9400/ --connections 100 --window 1 --size 20 ...
//! ```

use std::net::SocketAddr;

use fastwebsockets::{upgrade, FragmentCollector, OpCode, WebSocketError};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use tokio::net::TcpListener;

async fn echo(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = FragmentCollector::new(fut.await?);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
}

async fn upgrade(mut req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        // A client that goes away mid-frame is the normal end of a bench run: not worth a line.
        let _ = tokio::task::unconstrained(echo(fut)).await;
    });
    Ok(response)
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("fastwebsockets echo server on ws://{}/", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = http1::Builder::new().serve_connection(io, service_fn(upgrade)).with_upgrades().await;
        });
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:9400".into())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("address: {e}")))?;
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "a bench peer listens on loopback only"));
    }
    let workers: usize = match args.next() {
        Some(w) => w
            .parse()
            .ok()
            .filter(|&w| w > 0)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "workers: a number ≥ 1"))?,
        None => 2,
    };
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?
    };
    runtime.block_on(serve(addr))
}
