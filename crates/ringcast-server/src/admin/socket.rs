//! `/admin/ws`: the dashboard's live feed, one JSON snapshot a second, over ringcast's own WebSocket
//! codec (`ringcast_wire::frame`) on the connection hyper hands over after the 101.
//!
//! Why not the client protocol on an internal channel: the dashboard lives on the internal listener,
//! which speaks no client protocol; a channel would need a token scheme of its own to keep clients of
//! the public port out; and its pushes would be counted in the very deliveries it displays. Here one
//! sampler task makes each snapshot once, encodes it as one text frame (`Bytes`), and every viewer
//! writes that same frame.
//!
//! The viewer sends nothing but control frames: a ping is answered, a close echoed, and a data frame
//! (or anything the codec refuses) closes the socket with the precise code. The session's expiry is
//! checked before each frame: an expired login is closed 1008.

use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use ringcast_wire::close::encode_close_payload;
use ringcast_wire::frame::{decode_header, encode_frame, OpCode, Role};
use ringcast_wire::mask::apply_mask;
use ringcast_wire::CloseCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::session::Sessions;
use super::Feed;

/// Longest a viewer's socket may refuse a snapshot before the viewer is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a viewer's input held at once: control frames carry at most 125.
const MAX_INPUT: usize = 1024;

/// What one pass over a viewer's input decided.
enum Input {
    /// Keep going (pongs to send, possibly none).
    More,
    /// Close with this code (and answer nothing more).
    Close(CloseCode),
}

/// Parses every whole frame in `buf` (removing them); appends pongs to `replies`.
fn process(buf: &mut Vec<u8>, replies: &mut Vec<Bytes>) -> Input {
    loop {
        let (header, len) = match decode_header(buf, Role::Server, 0) {
            Ok(Some(h)) => h,
            Ok(None) if buf.len() >= MAX_INPUT => return Input::Close(CloseCode::TOO_BIG),
            Ok(None) => return Input::More,
            Err(e) => return Input::Close(e.close_code()),
        };
        let Ok(payload_len) = usize::try_from(header.payload_len) else { return Input::Close(CloseCode::TOO_BIG) };
        if len + payload_len > MAX_INPUT {
            return Input::Close(CloseCode::TOO_BIG);
        }
        if buf.len() < len + payload_len {
            return Input::More;
        }
        let payload = &mut buf[len..len + payload_len];
        if let Some(key) = header.mask {
            apply_mask(payload, key, 0);
        }
        match header.opcode {
            OpCode::Ping => replies.push(encode_frame(OpCode::Pong, payload)),
            OpCode::Pong => {}
            OpCode::Close => return Input::Close(CloseCode::NORMAL),
            OpCode::Text | OpCode::Binary | OpCode::Continuation => return Input::Close(CloseCode::UNSUPPORTED),
        }
        buf.drain(..len + payload_len);
    }
}

fn close_frame(code: CloseCode, reason: &str) -> Bytes {
    let mut payload = [0u8; 125];
    let n = encode_close_payload(code, reason, &mut payload);
    encode_frame(OpCode::Close, &payload[..n])
}

/// Serves one viewer until it leaves, its session expires, or the server shuts down (1001).
pub async fn serve(upgraded: hyper::upgrade::Upgraded, mut feed: watch::Receiver<Feed>, session_expiry: u64) {
    let mut io = TokioIo::new(upgraded);
    let mut input = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let mut replies = Vec::new();
    // The latest snapshot at once, so the page fills before the next tick.
    feed.mark_changed();
    let close = loop {
        tokio::select! {
            changed = feed.changed() => {
                if changed.is_err() {
                    break close_frame(CloseCode::GOING_AWAY, "server shutting down");
                }
                if !Sessions::still_valid(session_expiry) {
                    break close_frame(CloseCode::POLICY, "session expired");
                }
                let frame = match &*feed.borrow_and_update() {
                    Feed::Empty => continue,
                    Feed::Frame(frame) => frame.clone(),
                    Feed::Closed => break close_frame(CloseCode::GOING_AWAY, "server shutting down"),
                };
                match tokio::time::timeout(WRITE_TIMEOUT, io.write_all(&frame)).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
            read = io.read(&mut chunk) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                input.extend_from_slice(&chunk[..n]);
                let outcome = process(&mut input, &mut replies);
                for pong in replies.drain(..) {
                    if io.write_all(&pong).await.is_err() {
                        return;
                    }
                }
                if let Input::Close(code) = outcome {
                    break close_frame(code, "");
                }
            }
        }
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        io.write_all(&close).await?;
        io.flush().await?;
        io.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        ringcast_wire::frame::encode_client_frame(&mut out, true, opcode, payload, [1, 2, 3, 4]);
        out
    }

    #[test]
    fn a_ping_is_answered_with_its_payload_and_a_close_ends() {
        let mut buf = client_frame(OpCode::Ping, b"hi");
        let half = client_frame(OpCode::Close, &[3, 232]);
        buf.extend_from_slice(&half[..3]);
        let mut replies = Vec::new();
        assert!(matches!(process(&mut buf, &mut replies), Input::More));
        assert_eq!(replies, [encode_frame(OpCode::Pong, b"hi")]);
        assert_eq!(buf, half[..3], "the incomplete frame is kept");
        buf.extend_from_slice(&half[3..]);
        assert!(matches!(process(&mut buf, &mut replies), Input::Close(CloseCode::NORMAL)));
    }

    #[test]
    fn data_unmasked_and_oversized_frames_close_with_their_codes() {
        let mut replies = Vec::new();
        let mut text = client_frame(OpCode::Text, b"hello");
        assert!(matches!(process(&mut text, &mut replies), Input::Close(CloseCode::UNSUPPORTED)));
        let mut unmasked = encode_frame(OpCode::Ping, b"x").to_vec();
        assert!(matches!(process(&mut unmasked, &mut replies), Input::Close(CloseCode::PROTOCOL_ERROR)));
        let mut big = client_frame(OpCode::Binary, &[0; 2000]);
        assert!(matches!(process(&mut big, &mut replies), Input::Close(CloseCode::TOO_BIG)));
    }
}
