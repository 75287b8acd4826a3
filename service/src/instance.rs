//! This instance of the service, as every route sees it: its startup progress, its
//! metrics, the critical services once startup completed, and whether it drains.
//!
//! Its own module so the routes (`server`) and the `/ws` upgrade (`ws`) both use it
//! without depending on each other.

use crate::metrics::Metrics;
use crate::startup::{CriticalServices, Progress};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// The state shared by every route.
pub(crate) struct ServiceInstance {
    pub(crate) progress: Progress,
    pub(crate) metrics: Metrics,
    services: OnceLock<Arc<CriticalServices>>,
    draining: AtomicBool,
}

impl ServiceInstance {
    pub(crate) fn new(started: Instant) -> ServiceInstance {
        ServiceInstance {
            progress: Progress::new(started),
            metrics: Metrics::new(),
            services: OnceLock::new(),
            draining: AtomicBool::new(false),
        }
    }

    /// The critical services, once startup completed and while not draining.
    pub(crate) fn serving(&self) -> Option<&Arc<CriticalServices>> {
        if self.is_draining() {
            return None;
        }
        self.services.get()
    }

    /// True once startup completed, draining or not.
    pub(crate) fn started(&self) -> bool {
        self.services.get().is_some()
    }

    /// Startup completed with every critical service: the instance serves from now on.
    pub(crate) fn start_serving(&self, services: Arc<CriticalServices>) {
        let _ = self.services.set(services);
        self.progress.complete();
    }

    /// Shutdown began: `/ws` and readiness refuse from now on.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.progress.draining();
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}
