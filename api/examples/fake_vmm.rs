//! Serve the API with the test suite's fake VMM, to try curl or the CLI
//! without KVM:
//!
//! ```text
//! cargo run -p api --example fake_vmm -- /tmp/fake.sock
//! curl --unix-socket /tmp/fake.sock http://localhost/balloon
//! curl --unix-socket /tmp/fake.sock -X PATCH -d '{"target_mib": 256}' http://localhost/balloon
//! curl -N --unix-socket /tmp/fake.sock http://localhost/events
//! ```
//!
//! The fake guest moves the balloon 16 MiB per `GET /balloon`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: fake_vmm SOCKET_PATH");
        std::process::exit(2);
    };
    let (chan, rx) = api::channel(|| {});
    let hub = rx.event_hub();
    let server = match api::ApiServer::start(path.as_ref(), chan) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    println!("fake VMM serving the API on {}", server.path().display());
    let state = Arc::new(Mutex::new(common::FakeState {
        step_pages: 16 * 256,
        ..Default::default()
    }));
    loop {
        if let Some((req, responder)) = rx.recv_timeout(Duration::from_secs(1)) {
            let Ok(mut st) = state.lock() else { return };
            let shutdown = req == api::ApiRequest::Shutdown;
            responder.respond(common::answer(&mut st, &hub, req));
            if shutdown {
                println!("shutdown requested");
                // Give the response a moment to go out; dropping the
                // server removes the socket.
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
        }
    }
}
