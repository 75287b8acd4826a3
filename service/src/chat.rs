//! The seam between a socket and the agent supervisor: a per-socket lane that hands
//! chat requests to the supervisor in order, without ever blocking the socket's
//! loop, and carries the events it streams back.
//!
//! The lane is created on a socket's first chat request, so idle sockets (and
//! sockets that only ping) pay nothing for it. Both directions are bounded: a
//! client that floods requests gets `rate_limited`, one that stops reading is
//! disconnected.

use crate::agent::{AgentSupervisor, DeliveryError};
use crate::auth::UserId;
use crate::protocol::{ClientRequest, ServerEvent};
use std::sync::Arc;
use tokio::sync::{Notify, mpsc};

/// Requests of one socket waiting for the supervisor. Small: requests are answered
/// in milliseconds, and a client with this many outstanding is flooding.
const PENDING_REQUESTS: usize = 8;

pub struct ChatLane {
    requests: mpsc::Sender<ClientRequest>,
    events: mpsc::Receiver<ServerEvent>,
    /// Signalled when the supervisor found the event queue full: the client is not
    /// reading, and the socket should be closed rather than grow.
    overflow: Arc<Notify>,
}

/// What became of a request handed to the lane.
pub enum Submitted {
    Queued,
    /// Too many requests outstanding; answer `rate_limited`.
    Busy,
}

impl ChatLane {
    /// Starts the worker that feeds `supervisor` this socket's requests, one at a
    /// time. It ends when the lane is dropped (the socket closed).
    pub fn open(
        supervisor: AgentSupervisor,
        user: UserId,
        connection_id: Arc<str>,
        send_queue: usize,
    ) -> ChatLane {
        let (requests, mut pending) = mpsc::channel::<ClientRequest>(PENDING_REQUESTS);
        let (out, events) = mpsc::channel(send_queue);
        let overflow = Arc::new(Notify::new());
        let signal = overflow.clone();
        tokio::spawn(async move {
            while let Some(request) = pending.recv().await {
                match supervisor
                    .handle_from(&user, Some(&connection_id), request, out.clone())
                    .await
                {
                    Ok(()) => {}
                    Err(DeliveryError::QueueFull) => {
                        signal.notify_one();
                        break;
                    }
                    Err(DeliveryError::Closed) => break,
                }
            }
        });
        ChatLane {
            requests,
            events,
            overflow,
        }
    }

    pub fn submit(&self, request: ClientRequest) -> Submitted {
        match self.requests.try_send(request) {
            Ok(()) => Submitted::Queued,
            // Closed only if the worker stopped on overflow; the socket is about
            // to close for that reason anyway.
            Err(_) => Submitted::Busy,
        }
    }

    /// An event already queued for the client, without waiting.
    pub fn try_next(&mut self) -> Option<ServerEvent> {
        self.events.try_recv().ok()
    }

    /// The next event for the client, or the news that the client let the queue
    /// fill. Cancel-safe: a lost race leaves the event queued and the overflow
    /// signal stored.
    pub async fn next(&mut self) -> LaneEvent {
        tokio::select! {
            event = self.events.recv() => match event {
                Some(event) => LaneEvent::Event(event),
                // The worker is gone (it stopped on a full queue).
                None => LaneEvent::Overflow,
            },
            _ = self.overflow.notified() => LaneEvent::Overflow,
        }
    }
}

pub enum LaneEvent {
    Event(ServerEvent),
    Overflow,
}
