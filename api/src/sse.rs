//! The server's side of [`EventHub`]: a bounded broadcast ring of rendered
//! server-sent-event frames ([`EVENT_BUFFER`] of them). A reader that falls
//! behind by more than that loses the oldest frames and is told how many.

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::events::{EVENT_BUFFER, EventEnvelope, EventSink};

/// Render one SSE frame: `event:`, `id:` and a one-line JSON `data:`.
pub(crate) fn sse_frame(env: &EventEnvelope) -> Bytes {
    // serde_json never emits raw newlines in compact output, so one data line suffices.
    let data = serde_json::to_string(env).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!(
        "event: {}\nid: {}\ndata: {}\n\n",
        env.event.kind(),
        env.seq,
        data
    ))
}

/// The ring; clones share it.
#[derive(Clone)]
pub(crate) struct SseRing {
    tx: broadcast::Sender<Bytes>,
}

impl SseRing {
    pub(crate) fn new() -> Self {
        let (tx, _) = broadcast::channel(EVENT_BUFFER);
        SseRing { tx }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Bytes> {
        self.tx.subscribe()
    }
}

impl EventSink for SseRing {
    fn receivers(&self) -> usize {
        self.tx.receiver_count()
    }

    fn deliver(&self, env: &EventEnvelope) {
        // Err only means no receivers (raced with the last one leaving).
        let _ = self.tx.send(sse_frame(env));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ApiEvent, EventHub};
    use crate::types::VmState;

    #[test]
    fn frame_is_one_sse_event() {
        let env = EventEnvelope {
            seq: 3,
            timestamp_ms: 10,
            event: ApiEvent::BalloonChanged {
                target_mib: 1,
                actual_mib: 0,
                target_pages: 256,
                actual_pages: 0,
            },
        };
        let frame = sse_frame(&env);
        let text = std::str::from_utf8(&frame).unwrap();
        assert!(text.starts_with("event: BalloonChanged\nid: 3\ndata: {"));
        assert!(text.ends_with("}\n\n"));
    }

    #[test]
    fn publish_never_blocks_on_slow_reader() {
        let hub = EventHub::new();
        let ring = SseRing::new();
        assert!(hub.attach(Box::new(ring.clone())));
        let mut rx = ring.subscribe();
        for _ in 0..(EVENT_BUFFER * 4) {
            hub.publish(ApiEvent::VmStateChanged {
                state: VmState::Paused,
            });
        }
        assert_eq!(hub.published(), (EVENT_BUFFER * 4) as u64);
        match rx.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert!(n > 0),
            other => panic!("expected lag, got {other:?}"),
        }
    }
}
