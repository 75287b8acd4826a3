//! The WebSocket bridge (the `ws_bridge` critical service): admission of sockets
//! against the connection limits, the registry that lets shutdown close every open
//! socket with 1012, and the per-socket settings.
//!
//! Admission happens before the upgrade completes, so a socket over a limit never
//! reaches the chat loop; it is upgraded only to be told 1013 (try again later),
//! which is what clients and load balancers understand as "overloaded".

use crate::auth::UserId;
use crate::config::BridgeSettings;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

#[derive(Clone)]
pub struct WsBridge {
    inner: Arc<BridgeInner>,
}

struct BridgeInner {
    settings: BridgeSettings,
    open: AtomicUsize,
    per_user: Mutex<HashMap<UserId, u32>>,
    /// Signalled whenever the last open socket closes (drain waits on it).
    all_closed: Notify,
    /// Set once on shutdown (with `restart_notify`): every socket closes with 1012.
    restart: AtomicBool,
    restart_notify: Notify,
    next_id: AtomicU64,
    /// Random per process, so connection ids from different pods do not collide in logs.
    instance: u32,
}

/// Why a socket was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    Total,
    PerUser,
}

impl OverLimit {
    pub fn reason(self) -> &'static str {
        match self {
            OverLimit::Total => "server at its connection limit",
            OverLimit::PerUser => "too many connections for this user",
        }
    }
}

/// An admitted socket. Dropping it frees the slot, whatever way the socket ends.
pub struct Admission {
    bridge: WsBridge,
    user: UserId,
    pub connection_id: String,
}

impl WsBridge {
    pub fn new(settings: BridgeSettings) -> WsBridge {
        WsBridge {
            inner: Arc::new(BridgeInner {
                settings,
                open: AtomicUsize::new(0),
                per_user: Mutex::new(HashMap::new()),
                all_closed: Notify::new(),
                restart: AtomicBool::new(false),
                restart_notify: Notify::new(),
                next_id: AtomicU64::new(1),
                instance: rand::random(),
            }),
        }
    }

    pub fn settings(&self) -> &BridgeSettings {
        &self.inner.settings
    }

    /// Takes a slot for `user`, or says which limit is full.
    pub fn admit(&self, user: &UserId) -> Result<Admission, OverLimit> {
        let inner = &*self.inner;
        let previous = inner.open.fetch_add(1, Ordering::AcqRel);
        if previous >= inner.settings.max_connections {
            inner.open.fetch_sub(1, Ordering::AcqRel);
            return Err(OverLimit::Total);
        }
        {
            // A poisoned lock only means another socket panicked mid-update; the
            // counts are still integers, so keep serving.
            let mut per_user = inner.per_user.lock().unwrap_or_else(|e| e.into_inner());
            let count = per_user.entry(user.clone()).or_insert(0);
            if *count >= inner.settings.max_connections_per_user {
                drop(per_user);
                self.release_total();
                return Err(OverLimit::PerUser);
            }
            *count += 1;
        }
        let n = inner.next_id.fetch_add(1, Ordering::Relaxed);
        Ok(Admission {
            bridge: self.clone(),
            user: user.clone(),
            connection_id: format!("{:08x}-{n}", inner.instance),
        })
    }

    fn release_total(&self) {
        if self.inner.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.all_closed.notify_waiters();
        }
    }

    /// Open (admitted) sockets.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Resolves when shutdown asks every socket to close with 1012.
    pub fn restarting(&self) -> Restarting<'_> {
        Restarting {
            flag: &self.inner.restart,
            notified: Box::pin(self.inner.restart_notify.notified()),
            registered: false,
        }
    }

    /// Asks every open socket to close with 1012 and waits (bounded by the caller)
    /// until they have.
    pub async fn close_all(&self) {
        self.inner.restart.store(true, Ordering::Release);
        self.inner.restart_notify.notify_waiters();
        loop {
            let closed = self.inner.all_closed.notified();
            if self.open() == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// The shutdown signal as one socket's loop sees it.
///
/// Polled on every wake-up of every socket, so it must be nearly free: after the
/// first poll has registered the socket's task with the `Notify` (one lock), later
/// polls only read an atomic. A cancellation token or a plain `Notified` would take
/// a process-wide lock on each poll, which thousands of busy sockets contend on.
pub struct Restarting<'a> {
    flag: &'a AtomicBool,
    notified: Pin<Box<Notified<'a>>>,
    registered: bool,
}

impl Future for Restarting<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.flag.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if !self.registered {
            // The registered waker stays valid: this future is only ever polled
            // by the one task that owns the socket.
            self.registered = true;
            return self.notified.as_mut().poll(cx);
        }
        Poll::Pending
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        {
            let mut per_user = self
                .bridge
                .inner
                .per_user
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(count) = per_user.get_mut(&self.user) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    per_user.remove(&self.user);
                }
            }
        }
        self.bridge.release_total();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn bridge(total: usize, per_user: u32) -> WsBridge {
        WsBridge::new(BridgeSettings {
            max_message_bytes: 1024,
            max_connections: total,
            max_connections_per_user: per_user,
            idle_timeout: Duration::from_secs(60),
            keepalive: Duration::from_secs(30),
            send_queue: 8,
            send_timeout: Duration::from_secs(10),
            allowed_origins: vec![],
        })
    }

    #[test]
    fn limits_are_enforced_and_released() {
        let b = bridge(3, 2);
        let a: UserId = Arc::from("a");
        let c: UserId = Arc::from("c");
        let a1 = b.admit(&a).unwrap();
        let _a2 = b.admit(&a).unwrap();
        assert_eq!(b.admit(&a).err(), Some(OverLimit::PerUser));
        let _c1 = b.admit(&c).unwrap();
        assert_eq!(b.admit(&c).err(), Some(OverLimit::Total));
        drop(a1);
        assert_eq!(b.open(), 2);
        assert!(b.admit(&c).is_ok());
    }

    #[tokio::test]
    async fn close_all_returns_once_every_socket_is_gone() {
        let b = bridge(10, 10);
        let u: UserId = Arc::from("u");
        let admission = b.admit(&u).unwrap();
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.close_all().await }
        });
        b.restarting().await;
        drop(admission);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
