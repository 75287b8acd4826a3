//! The local platform's kube-proxy for one Service: a TCP listener on loopback that
//! sends each new connection to one of the Service's endpoints the EndpointSlice
//! controller marks `ready`, and then copies bytes both ways until either side
//! closes.
//!
//! It reads EndpointSlices from the API server and nothing else — never Pods or
//! processes — so what it routes to is exactly what Kubernetes publishes: a Pod
//! reaches clients only once its readiness probe passed and the controller wrote it
//! into a slice. An endpoint's address is a Pod IP; the connection goes to its
//! loopback twin ([`crate::pod_network`]) at the slice's port.
//!
//! As kube-proxy does: endpoints are taken in turn (IPVS's default round robin);
//! when none is ready, ones still `serving` while `terminating` are used; when there
//! are none of those either, the connection is closed at once (kube-proxy rejects
//! it). A connection already open stays with its endpoint whatever the slices say
//! later, as conntrack keeps it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store, reflector};

use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::pod_network;

/// How long dialing an endpoint may take before the connection is given up.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// One connection the router sent somewhere.
#[derive(Clone, Debug)]
pub struct Routed {
    /// When the client's connection was accepted.
    pub at: SystemTime,
    /// The Pod behind the endpoint (the slice's `targetRef`).
    pub pod: String,
    /// Where it went: the endpoint's loopback twin and port.
    pub to: SocketAddr,
}

/// What the router has done so far.
#[derive(Default)]
struct Ledger {
    routed: Mutex<Vec<Routed>>,
    /// Connections closed because no endpoint was ready or serving.
    no_endpoint: AtomicU64,
    /// Connections closed because the chosen endpoint did not answer.
    dial_failed: AtomicU64,
}

/// A running router; dropping it stops it (connections already proxied end too).
pub struct Router {
    address: SocketAddr,
    ledger: Arc<Ledger>,
    slices: Store<EndpointSlice>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Router {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Router {
    /// Starts routing `listen` (a loopback address; port 0 picks one) to Service
    /// `namespace/service`, once the first list of its EndpointSlices is in.
    pub async fn start(
        client: Client,
        namespace: &str,
        service: &str,
        listen: SocketAddr,
    ) -> Result<Router> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("the router for {namespace}/{service} binding {listen}"))?;
        let address = listener.local_addr()?;
        let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
        let config =
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
        let (slices, writer) = reflector::store();
        let watch = tokio::spawn({
            let service = format!("{namespace}/{service}");
            reflector(writer, watcher(api, config))
                .default_backoff()
                .for_each(move |event| {
                    if let Err(e) = event {
                        eprintln!("router for {service}: EndpointSlice watch: {e}");
                    }
                    futures::future::ready(())
                })
        });
        slices
            .wait_until_ready()
            .await
            .context("the router's first EndpointSlice list")?;
        let ledger = Arc::new(Ledger::default());
        let accept = tokio::spawn(serve(listener, slices.clone(), ledger.clone()));
        Ok(Router {
            address,
            ledger,
            slices,
            tasks: vec![watch, accept],
        })
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Every connection routed so far, in order.
    pub fn routed(&self) -> Vec<Routed> {
        self.ledger
            .routed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Connections closed at once because no endpoint was ready or serving.
    pub fn no_endpoint(&self) -> u64 {
        self.ledger.no_endpoint.load(Ordering::Relaxed)
    }

    /// Connections closed because the chosen endpoint did not accept them.
    pub fn dial_failed(&self) -> u64 {
        self.ledger.dial_failed.load(Ordering::Relaxed)
    }

    /// The endpoints a new connection may go to now, as `(pod, address)`.
    pub fn endpoints(&self) -> Vec<(String, SocketAddr)> {
        routable(&self.slices.state())
    }
}

async fn serve(listener: TcpListener, slices: Store<EndpointSlice>, ledger: Arc<Ledger>) {
    let turn = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let at = SystemTime::now();
        let endpoints = routable(&slices.state());
        if endpoints.is_empty() {
            ledger.no_endpoint.fetch_add(1, Ordering::Relaxed);
            drop(client);
            continue;
        }
        let (pod, to) = endpoints[turn.fetch_add(1, Ordering::Relaxed) % endpoints.len()].clone();
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let upstream = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(to)).await {
                Ok(Ok(upstream)) => upstream,
                _ => {
                    ledger.dial_failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            ledger
                .routed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Routed { at, pod, to });
            let (mut client, mut upstream) = (client, upstream);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
}

/// The endpoints of `slices` a new connection may go to: the ready ones, or when
/// there are none, the ones still serving while terminating. Sorted, so turns are
/// taken in a stable order.
fn routable(slices: &[Arc<EndpointSlice>]) -> Vec<(String, SocketAddr)> {
    let mut ready = Vec::new();
    let mut serving = Vec::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find_map(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            // An unset `ready` means "unknown", which consumers treat as ready.
            let is_ready = conditions.ready.unwrap_or(true);
            let is_serving = conditions.serving.unwrap_or(is_ready);
            let pod = endpoint
                .target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .unwrap_or_default();
            for address in &endpoint.addresses {
                let Some(twin) = address
                    .parse::<IpAddr>()
                    .ok()
                    .and_then(pod_network::loopback)
                else {
                    continue;
                };
                let entry = (pod.clone(), SocketAddr::from((twin, port)));
                if is_ready {
                    ready.push(entry);
                } else if is_serving {
                    serving.push(entry);
                }
            }
        }
    }
    let mut chosen = if ready.is_empty() { serving } else { ready };
    chosen.sort();
    chosen.dedup();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(endpoints: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "chat-abc"},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn only_ready_endpoints_take_new_connections() {
        let slices = [slice(json!([
            {"addresses": ["10.201.0.2"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "a"}},
            {"addresses": ["10.201.0.3"], "conditions": {"ready": false, "serving": false}, "targetRef": {"kind": "Pod", "name": "b"}},
            {"addresses": ["10.201.0.4"], "conditions": {"ready": false, "serving": true, "terminating": true}, "targetRef": {"kind": "Pod", "name": "c"}},
        ]))];
        assert_eq!(
            routable(&slices),
            vec![("a".to_owned(), "127.201.0.2:8080".parse().unwrap())]
        );
    }

    #[test]
    fn with_no_ready_endpoint_serving_terminating_ones_are_used_and_then_none() {
        let terminating = [slice(json!([
            {"addresses": ["10.201.0.4"], "conditions": {"ready": false, "serving": true, "terminating": true}, "targetRef": {"kind": "Pod", "name": "c"}},
        ]))];
        assert_eq!(routable(&terminating).len(), 1);
        let starting = [slice(json!([
            {"addresses": ["10.201.0.5"], "conditions": {"ready": false, "serving": false}, "targetRef": {"kind": "Pod", "name": "d"}},
        ]))];
        assert!(routable(&starting).is_empty());
    }

    #[test]
    fn an_address_off_the_pod_network_is_never_dialled() {
        let slices = [slice(json!([
            {"addresses": ["192.168.3.4"], "conditions": {"ready": true}},
        ]))];
        assert!(routable(&slices).is_empty());
    }
}
