//! A Pod's volumes written to disk for its container: `emptyDir`, `configMap`,
//! `secret` and the projected service-account token.

use super::*;

/// Writes a volume's content into a directory of its own under `dir` and returns
/// it: an empty directory for `emptyDir` (mode 0777, as the kubelet makes it);
/// the items of a `configMap` or `secret`; for `projected`, a service-account
/// token from the TokenRequest API bound to the Pod, ConfigMap items (the cluster
/// CA from `kube-root-ca.crt`) and downward-API fields.
pub(super) async fn materialize_volume(
    client: &Client,
    pod: &FieldContext<'_>,
    volume: &Volume,
    dir: &Path,
    uid: u32,
) -> Result<PathBuf, String> {
    let host = dir.join(&volume.name);
    let io = |e: std::io::Error| format!("volume {:?}: {e}", volume.name);
    std::fs::create_dir_all(&host).map_err(io)?;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), pod.namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), pod.namespace);
    let config_map_files =
        async |name: &str, optional: Option<bool>| -> Result<BTreeMap<String, Vec<u8>>, String> {
            match config_maps.get_opt(name).await {
                Ok(Some(cm)) => Ok(cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect()),
                Ok(None) if optional == Some(true) => Ok(BTreeMap::new()),
                Ok(None) => Err(format!("configmap \"{name}\" not found")),
                Err(e) => Err(format!("reading configmap \"{name}\": {e}")),
            }
        };
    let secret_files =
        async |name: &str, optional: Option<bool>| -> Result<BTreeMap<String, Vec<u8>>, String> {
            match secrets.get_opt(name).await {
                Ok(Some(s)) => Ok(s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect()),
                Ok(None) if optional == Some(true) => Ok(BTreeMap::new()),
                Ok(None) => Err(format!("secret \"{name}\" not found")),
                Err(e) => Err(format!("reading secret \"{name}\": {e}")),
            }
        };
    if volume.empty_dir.is_some() {
        std::fs::set_permissions(&host, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .map_err(io)?;
        return Ok(host);
    } else if let Some(source) = &volume.config_map {
        files = config_map_files(&source.name, source.optional).await?;
    } else if let Some(source) = &volume.secret {
        let name = source.secret_name.clone().unwrap_or_default();
        files = secret_files(&name, source.optional).await?;
    } else if let Some(projected) = &volume.projected {
        for source in projected.sources.iter().flatten() {
            if let Some(token) = &source.service_account_token {
                let request = TokenRequest {
                    spec: TokenRequestSpec {
                        audiences: token.audience.clone().into_iter().collect(),
                        expiration_seconds: token.expiration_seconds,
                        bound_object_ref: Some(BoundObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            name: Some(pod.name.to_owned()),
                            uid: Some(pod.uid.to_owned()),
                        }),
                    },
                    ..TokenRequest::default()
                };
                let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), pod.namespace);
                let issued = accounts
                    .create_token_request(pod.service_account, &PostParams::default(), &request)
                    .await
                    .map_err(|e| {
                        format!(
                            "requesting a token for serviceaccount {}/{}: {e}",
                            pod.namespace, pod.service_account
                        )
                    })?;
                let token_value = issued.status.map(|s| s.token).unwrap_or_default();
                files.insert(token.path.clone(), token_value.into_bytes());
            }
            if let Some(cm) = &source.config_map {
                let mut all = config_map_files(&cm.name, cm.optional).await?;
                match &cm.items {
                    Some(items) => {
                        for item in items {
                            if let Some(v) = all.remove(&item.key) {
                                files.insert(item.path.clone(), v);
                            }
                        }
                    }
                    None => files.extend(all),
                }
            }
            if let Some(secret) = &source.secret {
                files.extend(secret_files(&secret.name, secret.optional).await?);
            }
            if let Some(downward) = &source.downward_api {
                for item in downward.items.iter().flatten() {
                    let path = item
                        .field_ref
                        .as_ref()
                        .map(|f| f.field_path.as_str())
                        .unwrap_or_default();
                    let value = pod
                        .field(path)
                        .ok_or_else(|| format!("unsupported downward API fieldPath {path:?}"))?;
                    files.insert(item.path.clone(), value.into_bytes());
                }
            }
        }
    } else {
        return Err(format!(
            "volume {:?}: only emptyDir, configMap, secret and projected volumes are supported here",
            volume.name
        ));
    }
    for (path, content) in files {
        if path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(format!(
                "volume {:?}: item path {path:?} must be relative",
                volume.name
            ));
        }
        let file = host.join(&path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&file, content).map_err(io)?;
        // Readable by the container's user, as the kubelet's 0644 default is.
        std::os::unix::fs::chown(&file, Some(uid), None).map_err(io)?;
    }
    Ok(host)
}
