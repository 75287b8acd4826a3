//! The container images, proven by running exactly what they contain: each image is
//! unpacked and its entrypoint run from its own root filesystem (read-only, a tmpfs
//! `/tmp`, user 65532, none of the host's files), then pushed to a real registry on
//! loopback and pulled back. Built by `hack/image.sh`, the script `make image` runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chatgate_contract::build_info;
use chatgate_tests::http::probe as http_status;
use chatgate_tests::image::{
    Bundle, ContainerSpec, Image, Images, Mount, MountSource, tools_dir, unpack, workspace_root,
};
use chatgate_tests::process::{ManagedProcess, free_loopback_ports};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const TIMEOUT: Duration = Duration::from_secs(30);
const JWT_SECRET: &str = "an-image-test-signing-secret-of-32-bytes+";
/// Over this, an image misses the size target the README states.
const MAX_COMPRESSED_BYTES: u64 = 40 * 1000 * 1000;

async fn images() -> &'static Images {
    Images::shared().await.expect("the images build")
}

fn bundle(images: &Images, image: &Image) -> Bundle {
    unpack(
        image,
        &images.tools,
        &workspace_root().join("target/image-bundles"),
    )
    .expect("the image unpacks")
}

/// A running container and the files a test reads back from it.
struct Running {
    process: ManagedProcess,
    address: SocketAddr,
    termination_log: PathBuf,
    _scratch: tempfile::TempDir,
}

impl Running {
    /// Polls `/health/startup` until 200, or fails with the container's log.
    async fn started(&mut self) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.process.exit_status() {
                bail!(
                    "the container exited ({status}); termination message: {:?}\n{}",
                    std::fs::read_to_string(&self.termination_log).unwrap_or_default(),
                    self.process.log_tail(40)
                );
            }
            if let Ok(200) = http_status(self.address, "/health/startup").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "/health/startup never answered 200\n{}",
                    self.process.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the container to exit; its termination message.
    async fn exited(&mut self) -> Result<(i32, String)> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.process.exit_status() {
                let message = std::fs::read_to_string(&self.termination_log).unwrap_or_default();
                return Ok((status.code().unwrap_or(-1), message));
            }
            if Instant::now() > deadline {
                bail!("the container did not exit\n{}", self.process.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The next text frame on `socket`, as JSON.
async fn next_text<S>(socket: &mut tokio_tungstenite::WebSocketStream<S>) -> Result<Value>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let frame = tokio::time::timeout(TIMEOUT, socket.next())
            .await?
            .context("the socket closed")??;
        if let Message::Text(text) = frame {
            return Ok(serde_json::from_str(&text)?);
        }
    }
}

/// Runs the service image's entrypoint with `env` added to the image's own, the
/// termination log bound at the kubelet's path, and `extra` mounts.
fn run_service(images: &Images, env: &[(&str, &str)], extra: Vec<Mount>) -> Result<Running> {
    let bundle = bundle(images, &images.service);
    let scratch = tempfile::tempdir()?;
    let port = free_loopback_ports(1)?[0];
    let termination_log = scratch.path().join("termination-log");
    std::fs::write(&termination_log, "")?;
    // The container's user must be able to write it, as with the kubelet's file.
    std::os::unix::fs::chown(&termination_log, Some(65532), Some(65532))?;
    let mut spec = ContainerSpec::from_image(&bundle);
    spec.env
        .insert("CHATGATE_LISTEN".into(), format!("127.0.0.1:{port}"));
    spec.env
        .extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    spec.mounts.push(Mount {
        target: "/dev/termination-log".into(),
        source: MountSource::Bind {
            host: termination_log.clone(),
            read_only: false,
        },
    });
    spec.mounts.extend(extra);
    let log = scratch.path().join("container.log");
    let process = spec.spawn("chatgate-service", &bundle, &scratch.path().join("c"), &log)?;
    Ok(Running {
        process,
        address: SocketAddr::from(([127, 0, 0, 1], port)),
        termination_log,
        _scratch: scratch,
    })
}

/// Runs `image`'s entrypoint with `args` to completion; its exit code and output.
fn run_to_completion(images: &Images, image: &Image, args: &[&str]) -> Result<(i32, String)> {
    let bundle = bundle(images, image);
    let scratch = tempfile::tempdir()?;
    let mut spec = ContainerSpec::from_image(&bundle);
    spec.args.extend(args.iter().map(|a| (*a).to_owned()));
    let log = scratch.path().join("container.log");
    let mut process = spec.spawn(&image.name, &bundle, &scratch.path().join("c"), &log)?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = process.exit_status() {
            return Ok((status.code().unwrap_or(-1), std::fs::read_to_string(&log)?));
        }
        if Instant::now() > deadline {
            bail!(
                "{} {args:?} did not exit\n{}",
                image.name,
                process.log_tail(40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The image's config, read through its layout: index → manifest → config.
fn image_config(image: &Image) -> Result<(Value, Value)> {
    let blob = |digest: &str| -> Result<Value> {
        let path = image
            .layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        Ok(serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?)
    };
    let manifest = blob(&image.digest)?;
    let config = blob(
        manifest["config"]["digest"]
            .as_str()
            .context("a config digest")?,
    )?;
    Ok((manifest, config))
}

fn sha256_of(path: &Path) -> Result<String> {
    let output = std::process::Command::new("sha256sum").arg(path).output()?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

fn commit_time() -> Result<String> {
    let output = std::process::Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(workspace_root())
        .output()?;
    let epoch: i64 = String::from_utf8_lossy(&output.stdout).trim().parse()?;
    let output = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_builds_of_one_commit_give_the_same_digests() -> Result<()> {
    let first = images().await;
    let again_dir = workspace_root().join("target/images-rebuild");
    let again = tokio::task::spawn_blocking(move || {
        Images::build(
            &again_dir,
            chatgate_tests::image::test_binaries()?.as_deref(),
        )
    })
    .await??;
    for (a, b) in [
        (&first.service, &again.service),
        (&first.operator, &again.operator),
    ] {
        assert_eq!(
            a.digest, b.digest,
            "{} digest differs between builds",
            a.name
        );
        assert_eq!(
            sha256_of(&a.archive)?,
            sha256_of(&b.archive)?,
            "{}'s archive differs between builds",
            a.name
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_carry_their_version_revision_user_and_entrypoint() -> Result<()> {
    let images = images().await;
    let created = commit_time()?;
    for image in [&images.service, &images.operator] {
        let (manifest, config) = image_config(image)?;
        assert_eq!(image.version, build_info::VERSION);
        let c = &config["config"];
        assert_eq!(c["User"], "65532:65532", "{}", image.name);
        assert_eq!(
            c["Entrypoint"],
            json!([format!("/usr/local/bin/{}", image.name)])
        );
        assert!(
            c.get("Cmd").is_none_or(Value::is_null),
            "{}: {c}",
            image.name
        );
        let labels = &c["Labels"];
        assert_eq!(
            labels["org.opencontainers.image.version"],
            build_info::VERSION
        );
        assert_eq!(
            labels["org.opencontainers.image.revision"],
            build_info::REVISION
        );
        assert_eq!(labels["org.opencontainers.image.created"], created.as_str());
        assert_eq!(
            labels["org.opencontainers.image.source"],
            "https://github.com/chatgate/chatgate"
        );
        assert_eq!(
            manifest["annotations"], *labels,
            "manifest annotations = labels"
        );
        assert_eq!(config["created"], created.as_str());
        let compressed: u64 = manifest["layers"]
            .as_array()
            .context("layers")?
            .iter()
            .filter_map(|l| l["size"].as_u64())
            .sum();
        assert!(
            compressed < MAX_COMPRESSED_BYTES,
            "{} is {compressed} bytes compressed; the target is under 40 MB",
            image.name
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_and_the_examples_name_the_images_that_are_built() -> Result<()> {
    let images = images().await;
    let root = workspace_root();
    let chart = std::fs::read_to_string(root.join("charts/chatgate-operator/Chart.yaml"))?;
    let app_version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .context("appVersion in Chart.yaml")?
        .trim()
        .trim_matches('"');
    assert_eq!(
        app_version, images.operator.version,
        "Chart.yaml appVersion"
    );
    // The chart's default tag is its appVersion; render it to see the reference.
    let helm = chatgate_tests::bins::ensure_binaries()?.join("helm");
    let output = std::process::Command::new(helm)
        .args(["template", "chatgate"])
        .arg(root.join("charts/chatgate-operator"))
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rendered = String::from_utf8_lossy(&output.stdout);
    assert!(
        rendered.contains(&format!("image: \"{}\"", images.operator.reference())),
        "the chart's operator image is not {}",
        images.operator.reference()
    );
    let containerfile = std::fs::read_to_string(root.join("Containerfile"))?;
    assert!(
        containerfile.contains(&format!("ARG VERSION={}\n", images.service.version)),
        "the Containerfile's default VERSION is not {}",
        images.service.version
    );
    for example in [
        "chatservice-dev.yaml",
        "chatservice-staging.yaml",
        "chatservice-production.yaml",
    ] {
        let text = std::fs::read_to_string(root.join("examples").join(example))?;
        assert!(
            text.contains(&format!("image: {}", images.service.reference())),
            "examples/{example} does not name {}",
            images.service.reference()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_image_serves_an_authenticated_websocket_from_its_own_root() -> Result<()> {
    let images = images().await;
    // An https provider makes startup load the CA bundle the image ships; the
    // provider is not called unless a user message is sent.
    let mut running = run_service(
        images,
        &[
            ("CHATGATE_JWT_SECRET", JWT_SECRET),
            ("CHATGATE_LLM_PROVIDER", "openai"),
            ("CHATGATE_LLM_API_KEY", "sk-image-test"),
            ("CHATGATE_LLM_BASE_URL", "https://127.0.0.1:9/v1"),
        ],
        vec![],
    )?;
    running.started().await?;

    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "ada", "exp": jsonwebtoken::get_current_timestamp() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )?;
    let mut request = format!("ws://{}/ws", running.address).into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    assert_eq!(next_text(&mut socket).await?["type"], "connected");
    socket
        .send(Message::Text(json!({"type": "ping"}).to_string().into()))
        .await?;
    let pong = next_text(&mut socket).await?;
    assert_eq!(pong["type"], "pong");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ca_bundle_the_service_image_refuses_an_https_provider_by_name() -> Result<()> {
    let images = images().await;
    // An empty file over the bundle: the image as it would be without one.
    let empty = tempfile::NamedTempFile::new()?;
    let mut running = run_service(
        images,
        &[
            ("CHATGATE_JWT_SECRET", JWT_SECRET),
            ("CHATGATE_LLM_PROVIDER", "openai"),
            ("CHATGATE_LLM_API_KEY", "sk-image-test"),
            ("CHATGATE_LLM_BASE_URL", "https://api.example/v1"),
        ],
        vec![Mount {
            target: "/etc/ssl/certs/ca-certificates.crt".into(),
            source: MountSource::Bind {
                host: empty.path().to_owned(),
                read_only: true,
            },
        }],
    )?;
    let (code, message) = running.exited().await?;
    assert_ne!(code, 0);
    assert!(message.contains("phase=llm"), "{message}");
    assert!(message.contains("CHATGATE_LLM_BASE_URL"), "{message}");
    assert!(message.contains("no CA certificate"), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_image_cannot_write_outside_tmp() -> Result<()> {
    let images = images().await;
    // A database file outside /tmp: the read-only root refuses it, and startup says
    // which key to change.
    let mut running = run_service(
        images,
        &[
            ("CHATGATE_JWT_SECRET", JWT_SECRET),
            ("CHATGATE_DATABASE_URL", "sqlite:///var/chat.db?mode=rwc"),
            ("CHATGATE_STARTUP_BUDGET_SECONDS", "3"),
        ],
        vec![],
    )?;
    let (code, message) = running.exited().await?;
    assert_ne!(code, 0);
    assert!(message.contains("phase=storage"), "{message}");
    // The same URL under /tmp works.
    let mut running = run_service(
        images,
        &[
            ("CHATGATE_JWT_SECRET", JWT_SECRET),
            ("CHATGATE_DATABASE_URL", "sqlite:///tmp/chat.db?mode=rwc"),
        ],
        vec![],
    )?;
    running.started().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_images_print_their_version_and_the_operator_the_crd_that_crds_holds() -> Result<()> {
    let images = images().await;
    let (code, printed) =
        tokio::task::spawn_blocking(|| run_to_completion(images, &images.operator, &["crd"]))
            .await??;
    assert_eq!(code, 0, "{printed}");
    let committed =
        std::fs::read_to_string(workspace_root().join("crds/chatservices.chatgate.dev.yaml"))?;
    assert_eq!(printed, committed);
    for image in [&images.service, &images.operator] {
        let (code, printed) =
            tokio::task::spawn_blocking(move || run_to_completion(images, image, &["--version"]))
                .await??;
        assert_eq!(code, 0, "{printed}");
        assert_eq!(
            printed.trim(),
            format!("{} {}", image.name, build_info::VERSION_LINE)
        );
    }
    Ok(())
}

/// A distribution registry on a loopback port, storing into a temporary directory.
struct Registry {
    _process: ManagedProcess,
    address: String,
    _dir: tempfile::TempDir,
}

async fn start_registry(tools: &Path) -> Result<Registry> {
    let dir = tempfile::tempdir()?;
    let port = free_loopback_ports(1)?[0];
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        ),
    )?;
    let mut command = std::process::Command::new(tools.join("registry"));
    command.arg("serve").arg(&config);
    let process = ManagedProcess::spawn("registry", command, &dir.path().join("registry.log"))?;
    let deadline = Instant::now() + TIMEOUT;
    while http_status(SocketAddr::from(([127, 0, 0, 1], port)), "/v2/")
        .await
        .ok()
        != Some(200)
    {
        if Instant::now() > deadline {
            bail!("the registry did not answer /v2/\n{}", process.log_tail(40));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Registry {
        _process: process,
        address: format!("127.0.0.1:{port}"),
        _dir: dir,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_push_puts_both_images_in_a_registry_under_version_and_revision() -> Result<()> {
    let images = images().await;
    let tools = tools_dir()?;
    let registry = start_registry(&tools).await?;
    let repository = format!("{}/chatgate", registry.address);
    let output = tokio::process::Command::new("make")
        .arg("--no-print-directory")
        .arg("image-push")
        .arg(format!("REGISTRY={repository}"))
        .current_dir(workspace_root())
        .output()
        .await?;
    assert!(
        output.status.success(),
        "make image-push: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let crane = tools.join("crane");
    let mut pushed = BTreeMap::new();
    for image in [&images.service, &images.operator] {
        for tag in [build_info::VERSION, build_info::REVISION] {
            let reference = format!("{repository}/{}:{tag}", image.name);
            let output = std::process::Command::new(&crane)
                .args(["digest", &reference])
                .output()?;
            assert!(
                output.status.success(),
                "crane digest {reference}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            pushed.insert(
                reference,
                String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            );
        }
        // Pulled back into a layout, the image is the one that was built.
        let pulled = tempfile::tempdir()?;
        let reference = format!("{repository}/{}:{}", image.name, build_info::VERSION);
        let output = std::process::Command::new(&crane)
            .args(["pull", "--format=oci", &reference])
            .arg(pulled.path())
            .output()?;
        assert!(
            output.status.success(),
            "crane pull: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let index: Value =
            serde_json::from_slice(&std::fs::read(pulled.path().join("index.json"))?)?;
        assert_eq!(
            index["manifests"][0]["digest"],
            image.digest.as_str(),
            "pulled {reference}"
        );
    }
    for (reference, digest) in &pushed {
        let name = if reference.contains("chatgate-service") {
            &images.service
        } else {
            &images.operator
        };
        assert_eq!(digest, &name.digest, "{reference}");
    }
    Ok(())
}
