//! "Use the cluster I have, or give me one": what `make run` and `make cluster`
//! need when a person has no Kubernetes cluster at hand.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use kube::{Client, Config};

use crate::control_plane::{ControlPlane, ControlPlaneOptions};

/// How long a configured cluster gets to answer `/version` before it counts as
/// unreachable.
const REACH_TIMEOUT: Duration = Duration::from_secs(5);

/// A cluster to run against.
#[derive(Debug)]
pub enum LocalCluster {
    /// The one the environment's kubeconfig (or in-cluster config) points at.
    Existing(Box<Config>),
    /// A control plane started for this program; dropping it stops it.
    Started(Box<ControlPlane>),
}

impl LocalCluster {
    /// The kubeconfig to hand to child processes: `None` means "what the
    /// environment already says".
    pub fn kubeconfig_path(&self) -> Option<PathBuf> {
        match self {
            LocalCluster::Existing(_) => None,
            LocalCluster::Started(cp) => Some(cp.kubeconfig_path().to_owned()),
        }
    }

    pub fn client(&self) -> Result<Client> {
        match self {
            LocalCluster::Existing(config) => Ok(Client::try_from((**config).clone())?),
            LocalCluster::Started(cp) => Ok(cp.client()),
        }
    }

    pub fn server_url(&self) -> String {
        match self {
            LocalCluster::Existing(config) => config.cluster_url.to_string(),
            LocalCluster::Started(cp) => cp.server_url().to_owned(),
        }
    }
}

/// The configured cluster's client configuration, if it answers within a few seconds.
pub async fn reachable_cluster() -> Option<Config> {
    let config = Config::infer().await.ok()?;
    let client = Client::try_from(config.clone()).ok()?;
    match tokio::time::timeout(REACH_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(_)) => Some(config),
        _ => None,
    }
}

/// The configured cluster when it is reachable; otherwise a local control plane
/// started for the caller (building the binaries first on a fresh machine).
pub async fn connect_or_start() -> Result<LocalCluster> {
    if let Some(config) = reachable_cluster().await {
        return Ok(LocalCluster::Existing(Box::new(config)));
    }
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
    Ok(LocalCluster::Started(Box::new(cp)))
}
