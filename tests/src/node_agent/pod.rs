//! One Pod's container as the node agent runs it: start from its image, probes,
//! restarts with back-off, preStop and SIGTERM on deletion, and the container status
//! and termination message a kubelet would write.

use super::*;

/// How a container run ended.
pub(super) enum Ending {
    /// The process exited by itself.
    Exited {
        code: i32,
        started: Time,
        message: String,
    },
    /// A probe's failure threshold was reached; the process was killed.
    Killed {
        probe: &'static str,
        started: Time,
        message: String,
    },
    /// The environment could not be built (a missing Secret or key).
    ConfigError,
    /// The image could not be pulled (it is not one this node has).
    PullFailed,
    /// The Pod is being deleted.
    Deleted,
}

/// One Pod's container and its status as this agent reports it.
pub(super) struct PodRunner {
    pub(super) pods: Api<Pod>,
    pub(super) key: (String, String),
    pub(super) uid: String,
    pub(super) pod_spec: PodSpec,
    pub(super) spec_container: Container,
    pub(super) grace: Duration,
    pub(super) ip: Ipv4Addr,
    pub(super) start_time: Time,
    pub(super) restarts: i32,
    /// Failed pulls of the image so far.
    pub(super) pull_attempts: u32,
    pub(super) last_terminated: Option<Value>,
    pub(super) process: Option<ManagedProcess>,
    /// `(status, lastTransitionTime)` of the Ready condition, to change the time
    /// only when the status changes.
    pub(super) ready_since: (bool, Time),
}

impl PodRunner {
    pub(super) fn new(kubelet: &Kubelet, pod: Pod, ip: Ipv4Addr) -> PodRunner {
        let namespace = pod.namespace().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let grace = Duration::from_secs(
            spec.termination_grace_period_seconds
                .unwrap_or(30)
                .clamp(0, 3600) as u64,
        )
        .min(MAX_GRACE);
        PodRunner {
            pods: Api::namespaced(kubelet.client.clone(), &namespace),
            key: (namespace, pod.name_any()),
            uid: pod.uid().unwrap_or_default(),
            spec_container: spec.containers.first().cloned().unwrap_or_default(),
            pod_spec: spec,
            grace,
            ip,
            start_time: now(),
            restarts: 0,
            pull_attempts: 0,
            last_terminated: None,
            process: None,
            ready_since: (false, now()),
        }
    }

    /// Starts the container, runs its probes, and returns when it ends.
    pub(super) async fn run_container(&mut self, kubelet: &Kubelet) -> Ending {
        let reference = self.spec_container.image.clone().unwrap_or_default();
        let Some(image) = kubelet.images.resolve(&reference).cloned() else {
            // The first failed pull shows as ErrImagePull through its back-off;
            // later attempts as ImagePullBackOff, as the kubelet reports them.
            self.pull_attempts += 1;
            if self.pull_attempts > 1 {
                self.write_status(
                    json!({"waiting": {
                        "reason": "ImagePullBackOff",
                        "message": format!("Back-off pulling image \"{reference}\""),
                    }}),
                    false,
                    false,
                )
                .await;
                return Ending::PullFailed;
            }
            self.write_status(
                json!({"waiting": {
                    "reason": "ErrImagePull",
                    "message": format!(
                        "failed to pull and unpack image \"{reference}\": {reference}: not found (this node has {} and {})",
                        kubelet.images.service.reference(), kubelet.images.operator.reference()
                    ),
                }}),
                false,
                false,
            )
            .await;
            return Ending::PullFailed;
        };
        let dir = kubelet
            .workdir
            .join(format!("{}-{}-{}", self.key.0, self.key.1, self.restarts));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("node agent: creating {}: {e}", dir.display());
            return Ending::ConfigError;
        }
        let bundle = {
            let (image, tools, bundles) = (
                image.clone(),
                kubelet.images.tools.clone(),
                kubelet.workdir.join("bundles"),
            );
            match tokio::task::spawn_blocking(move || unpack(&image, &tools, &bundles)).await {
                Ok(Ok(bundle)) => bundle,
                Ok(Err(e)) => {
                    eprintln!("node agent: unpacking {reference}: {e:#}");
                    return Ending::ConfigError;
                }
                Err(e) => {
                    eprintln!("node agent: unpacking {reference}: {e}");
                    return Ending::ConfigError;
                }
            }
        };
        let termination_log = dir.join("termination-log");
        let log = dir.join("container.log");
        // The service listens on the Pod IP's loopback twin at its declared port;
        // any other image on the host's loopback at its declared ports.
        let told = listens_where_told(&image);
        let address = if told {
            let twin = pod_network::loopback(IpAddr::V4(self.ip)).unwrap_or(Ipv4Addr::LOCALHOST);
            SocketAddr::from((
                twin,
                first_port(&self.spec_container).unwrap_or(SERVICE_PORT),
            ))
        } else {
            let port = match first_port(&self.spec_container) {
                Some(port) => port,
                None => match free_loopback_ports(1) {
                    Ok(ports) => ports[0],
                    Err(e) => {
                        eprintln!("node agent: no free loopback port: {e:#}");
                        return Ending::ConfigError;
                    }
                },
            };
            SocketAddr::from((Ipv4Addr::LOCALHOST, port))
        };
        let spec = match self
            .container_spec(kubelet, &bundle, &termination_log, told.then_some(address))
            .await
        {
            Ok(spec) => spec,
            Err(message) => {
                self.write_status(
                    json!({"waiting": {"reason": "CreateContainerConfigError", "message": message}}),
                    false,
                    false,
                )
                .await;
                return Ending::ConfigError;
            }
        };
        let started = now();
        match spec.spawn(&self.key.1, &bundle, &dir.join("container"), &log) {
            Ok(p) => self.process = Some(p),
            Err(e) => {
                eprintln!("node agent: {e:#}");
                return Ending::ConfigError;
            }
        }
        kubelet.record(&self.key, |r| {
            r.address = Some(address);
            r.log = Some(log.clone());
            r.starts += 1;
        });
        let running = json!({"running": {"startedAt": started}});
        self.write_status(running.clone(), false, false).await;

        let c = &self.spec_container;
        let probe = |p: &Option<Probe>| p.clone().map(|p| ProbeState::new(p, c, address, told));
        let mut startup = probe(&c.startup_probe);
        let mut readiness = probe(&c.readiness_probe);
        let mut liveness = probe(&c.liveness_probe);
        let mut is_started = startup.is_none();
        let mut is_ready = false;
        if is_started {
            self.write_status(running.clone(), true, readiness.is_none())
                .await;
            is_ready = readiness.is_none();
        }
        let begun = Instant::now();
        loop {
            if let Some(code) = self.process.as_mut().and_then(|p| p.exit_status()) {
                let code = code.code().unwrap_or(137);
                self.process = None;
                return Ending::Exited {
                    code,
                    started,
                    message: termination_message(
                        &self.spec_container,
                        &termination_log,
                        &log,
                        code,
                    ),
                };
            }
            let now = Instant::now();
            if !is_started {
                if let Some(probe) = startup.as_mut()
                    && probe.due(now, begun)
                {
                    match probe.run().await {
                        Verdict::Passed => {
                            is_started = true;
                            // Readiness is probed at once, not a period later.
                            if let Some(r) = readiness.as_mut() {
                                r.next = None;
                            }
                            self.write_status(running.clone(), true, false).await;
                        }
                        Verdict::Failing => {}
                        Verdict::Failed(why) => {
                            return self.kill("startup", started, why, &termination_log).await;
                        }
                    }
                }
            } else {
                if let Some(probe) = readiness.as_mut()
                    && probe.due(now, begun)
                {
                    let ready = match probe.run().await {
                        Verdict::Passed => true,
                        Verdict::Failing => is_ready,
                        Verdict::Failed(_) => false,
                    };
                    if ready {
                        kubelet.record(&self.key, |r| r.ever_ready = true);
                    }
                    if ready != is_ready {
                        is_ready = ready;
                        self.write_status(running.clone(), true, ready).await;
                    }
                }
                if let Some(probe) = liveness.as_mut()
                    && probe.due(now, begun)
                    && let Verdict::Failed(why) = probe.run().await
                {
                    return self.kill("liveness", started, why, &termination_log).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The container as the Pod specifies it, on the image unpacked in `bundle`:
    /// command and arguments, environment (with `CHATGATE_LISTEN` when `listen` is
    /// given), user, root filesystem mode and volumes. An error is what the kubelet
    /// would report as `CreateContainerConfigError`.
    async fn container_spec(
        &self,
        kubelet: &Kubelet,
        bundle: &Bundle,
        termination_log: &Path,
        listen: Option<SocketAddr>,
    ) -> Result<ContainerSpec, String> {
        let container = &self.spec_container;
        let mut spec = ContainerSpec::from_image(bundle);
        // `command` replaces the entrypoint and drops the image's `cmd`; `args`
        // replaces `cmd` (the image config's split is in the bundle's args: the
        // entrypoint is the first element, as chatgate's images have no `cmd`).
        match (&container.command, &container.args) {
            (Some(command), args) => {
                spec.args = command
                    .iter()
                    .chain(args.iter().flatten())
                    .cloned()
                    .collect();
            }
            (None, Some(args)) => {
                spec.args.truncate(1);
                spec.args.extend(args.iter().cloned());
            }
            (None, None) => {}
        }
        let context = FieldContext {
            namespace: &self.key.0,
            name: &self.key.1,
            uid: &self.uid,
            node: &kubelet.node,
            service_account: self
                .pod_spec
                .service_account_name
                .as_deref()
                .unwrap_or("default"),
        };
        spec.env
            .extend(resolve_env(&kubelet.client, &context, container).await?);
        // What every kubelet adds: where the API server is.
        spec.env
            .insert("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into());
        spec.env.insert(
            "KUBERNETES_SERVICE_PORT".into(),
            kubelet.api_port.to_string(),
        );
        if let Some(listen) = listen {
            spec.env
                .insert("CHATGATE_LISTEN".into(), listen.to_string());
        }
        let pod_security = self.pod_spec.security_context.as_ref();
        let security = container.security_context.as_ref();
        if let Some(uid) = security
            .and_then(|s| s.run_as_user)
            .or(pod_security.and_then(|s| s.run_as_user))
        {
            spec.uid =
                u32::try_from(uid).map_err(|_| format!("runAsUser {uid} is out of range"))?;
        }
        if let Some(gid) = security
            .and_then(|s| s.run_as_group)
            .or(pod_security.and_then(|s| s.run_as_group))
        {
            spec.gid =
                u32::try_from(gid).map_err(|_| format!("runAsGroup {gid} is out of range"))?;
        }
        let non_root = security
            .and_then(|s| s.run_as_non_root)
            .or(pod_security.and_then(|s| s.run_as_non_root))
            .unwrap_or(false);
        if non_root && spec.uid == 0 {
            return Err("container has runAsNonRoot and image will run as root".into());
        }
        spec.read_only_root = security
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false);
        // The image's own /tmp is what a runtime gives; volumes replace it where
        // the Pod mounts one.
        spec.mounts.clear();
        for mount in container.volume_mounts.iter().flatten() {
            let volume = self
                .pod_spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .ok_or_else(|| format!("volume {:?} is mounted but not defined", mount.name))?;
            let host = materialize_volume(
                &kubelet.client,
                &context,
                volume,
                // A Pod's volumes outlive its container's restarts.
                &kubelet
                    .workdir
                    .join(format!("{}-{}-volumes", self.key.0, self.key.1)),
                spec.uid,
            )
            .await?;
            spec.mounts.push(Mount {
                target: mount.mount_path.clone(),
                source: MountSource::Bind {
                    host,
                    read_only: mount.read_only.unwrap_or(false) || volume.empty_dir.is_none(),
                },
            });
        }
        std::fs::write(termination_log, "")
            .map_err(|e| format!("creating the termination log: {e}"))?;
        std::os::unix::fs::chown(termination_log, Some(spec.uid), Some(spec.gid))
            .map_err(|e| format!("handing the termination log to the container's user: {e}"))?;
        spec.mounts.push(Mount {
            target: container
                .termination_message_path
                .clone()
                .unwrap_or_else(|| "/dev/termination-log".into()),
            source: MountSource::Bind {
                host: termination_log.to_owned(),
                read_only: false,
            },
        });
        Ok(spec)
    }

    /// Kills the container after a failed probe.
    async fn kill(
        &mut self,
        probe: &'static str,
        started: Time,
        why: String,
        termination_log: &Path,
    ) -> Ending {
        self.stop_container().await;
        let written = std::fs::read_to_string(termination_log).unwrap_or_default();
        Ending::Killed {
            probe,
            started,
            message: if written.is_empty() { why } else { written },
        }
    }

    /// SIGTERM (after the `preStop` sleep), then SIGKILL once the grace period is over.
    pub(super) async fn stop_container(&mut self) {
        let Some(mut process) = self.process.take() else {
            return;
        };
        let pre_stop = self
            .spec_container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.sleep.as_ref())
            .map(|s| Duration::from_secs(s.seconds.clamp(0, 3600) as u64))
            .unwrap_or_default()
            .min(self.grace);
        tokio::time::sleep(pre_stop).await;
        let grace = self.grace.saturating_sub(pre_stop);
        let _ = tokio::task::spawn_blocking(move || process.stop(grace)).await;
    }

    /// Writes the ended container into `lastState` and waits in `CrashLoopBackOff`.
    pub(super) async fn record_exit(&mut self, ending: Ending, backoff: Duration) {
        let finished = now();
        let terminated = match ending {
            Ending::Exited {
                code,
                started,
                message,
            } => json!({
                "exitCode": code,
                "reason": if code == 0 { "Completed" } else { "Error" },
                "message": message, "startedAt": started, "finishedAt": finished,
            }),
            Ending::Killed {
                probe,
                started,
                message,
            } => json!({
                "exitCode": 137, "reason": format!("{probe} probe failed"),
                "message": message, "startedAt": started, "finishedAt": finished,
            }),
            // Already reported as CreateContainerConfigError; retried after the back-off.
            Ending::ConfigError | Ending::PullFailed | Ending::Deleted => return,
        };
        self.restarts += 1;
        self.last_terminated = Some(terminated);
        let waiting = json!({"waiting": {
            "reason": "CrashLoopBackOff",
            "message": format!(
                "back-off {}s restarting failed container={} pod={}_{}",
                backoff.as_secs(), self.spec_container.name, self.key.1, self.key.0
            ),
        }});
        self.write_status(waiting, false, false).await;
    }

    /// Removes the Pod once its container stopped, as the kubelet does.
    pub(super) async fn finish_deletion(&self) {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let _ = self.pods.delete(&self.key.1, &params).await;
    }

    /// Writes Pod status: phase, IPs, the container's state, and the conditions.
    async fn write_status(&mut self, state: Value, started: bool, ready: bool) {
        if self.ready_since.0 != ready {
            self.ready_since = (ready, now());
        }
        let since = &self.ready_since.1;
        let flag = |b: bool| if b { "True" } else { "False" };
        let not_ready_reason = (!ready).then_some("ContainersNotReady");
        let mut container = json!({
            "name": self.spec_container.name,
            "image": self.spec_container.image,
            "imageID": "",
            "containerID": format!("chatgate-node-agent://{}-{}", self.uid, self.restarts),
            "ready": ready,
            "started": started,
            "restartCount": self.restarts,
            "state": state,
        });
        if let Some(last) = &self.last_terminated {
            container["lastState"] = json!({ "terminated": last });
        }
        let condition = |type_: &str| {
            json!({
                "type": type_, "status": flag(ready), "reason": not_ready_reason,
                "lastTransitionTime": since,
            })
        };
        let status = json!({
            "status": {
                "phase": "Running",
                "hostIP": "10.250.255.1",
                "hostIPs": [{ "ip": "10.250.255.1" }],
                "podIP": self.ip,
                "podIPs": [{ "ip": self.ip }],
                "startTime": self.start_time,
                "conditions": [
                    { "type": "Initialized", "status": "True", "lastTransitionTime": self.start_time },
                    { "type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": self.start_time },
                    condition("ContainersReady"),
                    condition("Ready"),
                ],
                "containerStatuses": [container],
            }
        });
        if let Err(e) = self
            .pods
            .patch_status(
                &self.key.1,
                &PatchParams::default(),
                &Patch::Strategic(status),
            )
            .await
        {
            // A Pod deleted meanwhile is the usual cause; the watch stops the runner.
            eprintln!(
                "node agent: status of pod {}/{}: {e}",
                self.key.0, self.key.1
            );
        }
    }
}

/// The container's termination message: the file, or under `FallbackToLogsOnError`
/// after a failure with an empty file, the log's tail.
pub(super) fn termination_message(
    container: &Container,
    file: &Path,
    log: &Path,
    code: i32,
) -> String {
    let written = std::fs::read_to_string(file).unwrap_or_default();
    let fallback = container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
    if written.is_empty() && fallback && code != 0 {
        let text = tail(log, FALLBACK_LOG_LINES);
        let start = text.len().saturating_sub(FALLBACK_LOG_BYTES);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        return text[start..].to_owned();
    }
    written
}
