//! The admin kubeconfig of a local control plane, as kube's own `Kubeconfig` type.

use super::*;

/// Name of the cluster, the user's context and the current context in the kubeconfig.
pub(super) const KUBECONFIG_CONTEXT: &str = "chatgate-local";

/// A kubeconfig for the admin, with every credential inline so the file can be
/// copied anywhere.
pub(super) fn kubeconfig(server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Kubeconfig {
    Kubeconfig {
        api_version: Some("v1".into()),
        kind: Some("Config".into()),
        clusters: vec![NamedCluster {
            name: KUBECONFIG_CONTEXT.into(),
            cluster: Some(Cluster {
                server: Some(server.into()),
                certificate_authority_data: Some(BASE64.encode(ca_pem)),
                ..Cluster::default()
            }),
            ..NamedCluster::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: ADMIN_USER.into(),
            auth_info: Some(AuthInfo {
                client_certificate_data: Some(BASE64.encode(cert_pem)),
                client_key_data: Some(BASE64.encode(key_pem).into()),
                ..AuthInfo::default()
            }),
            ..NamedAuthInfo::default()
        }],
        contexts: vec![NamedContext {
            name: KUBECONFIG_CONTEXT.into(),
            context: Some(KubeContext {
                cluster: KUBECONFIG_CONTEXT.into(),
                user: Some(ADMIN_USER.into()),
                namespace: Some("default".into()),
                ..KubeContext::default()
            }),
            ..NamedContext::default()
        }],
        current_context: Some(KUBECONFIG_CONTEXT.into()),
        ..Kubeconfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubeconfig_carries_the_server_and_inline_credentials() {
        // Round-trip through the file format, as kubectl and helm read it.
        let yaml =
            serde_norway::to_string(&kubeconfig("https://127.0.0.1:6443", "CA", "CERT", "KEY"))
                .unwrap();
        let parsed = Kubeconfig::from_yaml(&yaml).unwrap();
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(
            cluster.certificate_authority_data.as_deref(),
            Some(BASE64.encode("CA").as_str())
        );
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(
            user.client_certificate_data.as_deref(),
            Some(BASE64.encode("CERT").as_str())
        );
        assert_eq!(parsed.current_context.as_deref(), Some("chatgate-local"));
    }
}
