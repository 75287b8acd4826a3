//! What a container is started with: its environment as the kubelet resolves it
//! (`envFrom`, `env`, Secret, ConfigMap and field references) and the ports it
//! listens on.

use super::*;

/// The container's environment, as the kubelet builds it: `envFrom` first, then
/// `env`. A missing ConfigMap, Secret or key is an error naming it.
pub(super) async fn resolve_env(
    client: &Client,
    pod: &FieldContext<'_>,
    container: &Container,
) -> Result<BTreeMap<String, String>, String> {
    let namespace = pod.namespace;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let config_map = |name: String| {
        let api = config_maps.clone();
        async move {
            match api.get_opt(&name).await {
                Ok(Some(cm)) => Ok(cm.data.unwrap_or_default()),
                Ok(None) => Err(format!("configmap \"{name}\" not found")),
                Err(e) => Err(format!("reading configmap \"{name}\": {e}")),
            }
        }
    };
    let secret = |name: String| {
        let api = secrets.clone();
        async move {
            match api.get_opt(&name).await {
                Ok(Some(s)) => Ok(s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                    .collect::<BTreeMap<_, _>>()),
                Ok(None) => Err(format!("secret \"{name}\" not found")),
                Err(e) => Err(format!("reading secret \"{name}\": {e}")),
            }
        }
    };
    let mut env = BTreeMap::new();
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let values = if let Some(r) = &source.config_map_ref {
            match config_map(r.name.clone()).await {
                Ok(v) => v,
                Err(_) if r.optional == Some(true) => continue,
                Err(e) => return Err(e),
            }
        } else if let Some(r) = &source.secret_ref {
            match secret(r.name.clone()).await {
                Ok(v) => v,
                Err(_) if r.optional == Some(true) => continue,
                Err(e) => return Err(e),
            }
        } else {
            continue;
        };
        env.extend(values.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) if from.field_ref.is_some() => {
                let path = from
                    .field_ref
                    .as_ref()
                    .map(|f| f.field_path.as_str())
                    .unwrap_or_default();
                pod.field(path)
                    .ok_or_else(|| format!("unsupported fieldPath {path:?} in env {}", var.name))?
            }
            (None, Some(from)) => {
                let (values, name, key, optional, kind) = if let Some(r) = &from.secret_key_ref {
                    (
                        secret(r.name.clone()).await,
                        &r.name,
                        &r.key,
                        r.optional,
                        "secret",
                    )
                } else if let Some(r) = &from.config_map_key_ref {
                    (
                        config_map(r.name.clone()).await,
                        &r.name,
                        &r.key,
                        r.optional,
                        "configmap",
                    )
                } else {
                    continue;
                };
                match values.map(|mut v| v.remove(key)) {
                    Ok(Some(v)) => v,
                    _ if optional == Some(true) => continue,
                    Ok(None) => {
                        return Err(format!(
                            "couldn't find key {key} in {kind} {namespace}/{name}"
                        ));
                    }
                    Err(e) => return Err(e),
                }
            }
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    Ok(env)
}

/// What a `fieldRef` or downward-API item can name about the Pod.
pub(super) struct FieldContext<'a> {
    pub(super) namespace: &'a str,
    pub(super) name: &'a str,
    pub(super) uid: &'a str,
    pub(super) node: &'a str,
    pub(super) service_account: &'a str,
}

impl FieldContext<'_> {
    pub(super) fn field(&self, path: &str) -> Option<String> {
        Some(
            match path {
                "metadata.name" => self.name,
                "metadata.namespace" => self.namespace,
                "metadata.uid" => self.uid,
                "spec.nodeName" => self.node,
                "spec.serviceAccountName" => self.service_account,
                _ => return None,
            }
            .to_owned(),
        )
    }
}

/// The port the service image declares (`EXPOSE 8080/tcp`), for a container that
/// names none.
pub(super) const SERVICE_PORT: u16 = 8080;

/// Whether the image takes its listen address from `CHATGATE_LISTEN` (the
/// service), so the agent can give each of its containers an address of its own.
pub(super) fn listens_where_told(image: &Image) -> bool {
    image.name == "chatgate-service"
}

/// The container's first declared port.
pub(super) fn first_port(container: &Container) -> Option<u16> {
    container
        .ports
        .iter()
        .flatten()
        .next()
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// A probe's port, by number or by the name of a container port.
pub(super) fn container_port(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}
