//! The local platform's pod network: every Pod the node agent runs gets an IP of its
//! own, and that IP has a twin on loopback where the container really listens.
//!
//! A Pod's IP is `10.N.a.b` (what the Pod status and the EndpointSlices carry; the
//! API server refuses loopback addresses there), and its service listens on
//! `127.N.a.b` — the same host part in the loopback range, which Linux routes to `lo`
//! with no set-up. So an endpoint `10.N.a.b:8080` is reached at `127.N.a.b:8080` by a
//! rule anyone can apply (the router, a probe, a person with curl), each Pod can use
//! its declared container port, and nothing ever dials an address off the machine.
//!
//! `N` is picked per process from its pid, so two platforms on one machine (a test
//! binary and `make run`) do not hand out the same addresses.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The first octet of every Pod IP.
const POD_FIRST_OCTET: u8 = 10;
/// Second octets are taken from this range (one per process).
const NETWORK_BASE: u32 = 200;
const NETWORKS: u32 = 50;
/// Host parts per third octet (`.2` to `.251`; `.0`, `.1` and the top stay unused).
const HOSTS_PER_BLOCK: u32 = 250;

/// This process's second octet.
fn network() -> u8 {
    static NETWORK: OnceLock<u8> = OnceLock::new();
    *NETWORK.get_or_init(|| (NETWORK_BASE + std::process::id() % NETWORKS) as u8)
}

/// A new Pod IP, never handed out before by this process.
pub fn allocate() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let block = (n / HOSTS_PER_BLOCK) % 256;
    let host = n % HOSTS_PER_BLOCK + 2;
    Ipv4Addr::new(POD_FIRST_OCTET, network(), block as u8, host as u8)
}

/// Where a Pod with IP `pod_ip` is reached on this machine: its loopback twin.
/// `None` for an address that is not a Pod IP of the local platform.
pub fn loopback(pod_ip: IpAddr) -> Option<Ipv4Addr> {
    match pod_ip {
        IpAddr::V4(ip) if ip.octets()[0] == POD_FIRST_OCTET => {
            let [_, net, block, host] = ip.octets();
            Some(Ipv4Addr::new(127, net, block, host))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_allocated_pod_ip_maps_to_a_distinct_loopback_address() {
        let ips: Vec<Ipv4Addr> = (0..600).map(|_| allocate()).collect();
        let twins: std::collections::BTreeSet<Ipv4Addr> = ips
            .iter()
            .map(|ip| loopback(IpAddr::V4(*ip)).expect("a pod IP"))
            .collect();
        assert_eq!(twins.len(), ips.len());
        assert!(twins.iter().all(|t| t.is_loopback()));
        assert!(ips.iter().all(|ip| !ip.is_loopback()));
    }

    #[test]
    fn an_address_off_the_pod_network_has_no_twin() {
        assert_eq!(loopback("192.168.1.5".parse().unwrap()), None);
        assert_eq!(loopback("::1".parse().unwrap()), None);
        assert_eq!(
            loopback("10.201.0.7".parse().unwrap()),
            Some(Ipv4Addr::new(127, 201, 0, 7))
        );
    }
}
