//! The VMM side of the API: the server thread hands each request to the VMM thread through
//! a channel and an eventfd, and waits for the answer. Everything that touches the VM
//! happens on the VMM thread, in order.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::events::Events;
use ferry_api::server::Handler;
use ferry_api::{ApiError, Request, Response};
use vmm_sys_util::eventfd::EventFd;

/// A request and where to send its answer.
pub(crate) type Call = (Request, Sender<Result<Response, ApiError>>);

/// How long a request may take on the VMM thread before the client is told so (a snapshot
/// of a large VM writes gigabytes).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// The server's end.
#[derive(Debug)]
pub(crate) struct Bridge {
    calls: Mutex<Sender<Call>>,
    wake: EventFd,
    events: Arc<Events>,
}

/// The VMM thread's end.
#[derive(Debug)]
pub(crate) struct Inbox {
    pub calls: Receiver<Call>,
    pub wake: EventFd,
}

/// A connected pair.
/// A connected pair; the server streams `events` itself (never through the VMM thread).
pub(crate) fn channel(events: Arc<Events>) -> std::io::Result<(Bridge, Inbox)> {
    let (tx, rx) = mpsc::channel();
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    Ok((Bridge { calls: Mutex::new(tx), wake: wake.try_clone()?, events }, Inbox { calls: rx, wake }))
}

impl Handler for Bridge {
    fn events(&self) -> Option<Arc<Events>> {
        Some(self.events.clone())
    }

    fn handle(&self, request: Request) -> Result<Response, ApiError> {
        let (tx, rx) = mpsc::channel();
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((request, tx))
            .map_err(|_| ApiError::conflict("the VM is shutting down"))?;
        let _ = self.wake.write(1);
        // A migration answers once it has started (202); it is followed in /vm/events.
        match rx.recv_timeout(REQUEST_TIMEOUT) {
            Ok(answer) => answer,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ApiError::internal("the VMM did not answer in time")),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ApiError::conflict("the VM is shutting down")),
        }
    }
}
