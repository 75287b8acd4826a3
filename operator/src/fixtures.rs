//! Builders of `ChatService` values for tests (unit tests here and the control-plane
//! tests in `chatgate-tests`), so each test states only what matters to it:
//! `ChatService::test("chat").in_env(Environment::Staging).replicas(2).build()`.

use crate::crd::{BaselineRef, ChatService, ChatServiceSpec, ParityMode, ParitySpec, SecretKeyRef};
use chatgate_contract::Environment;
use kube::api::ObjectMeta;

/// A ChatService under construction.
#[derive(Debug, Clone)]
pub struct ChatServiceBuilder {
    cs: ChatService,
}

impl ChatService {
    /// A development ChatService named `name` with every default: valid as is.
    pub fn test(name: &str) -> ChatServiceBuilder {
        let spec: ChatServiceSpec = serde_json::from_value(serde_json::json!({
            "image": "ghcr.io/chatgate/chatgate-service:test",
            "environment": "development",
        }))
        .expect("the minimal spec deserializes");
        let mut cs = ChatService::new(name, spec);
        cs.metadata = ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        };
        ChatServiceBuilder { cs }
    }
}

impl ChatServiceBuilder {
    pub fn namespace(mut self, ns: &str) -> Self {
        self.cs.metadata.namespace = Some(ns.to_owned());
        self
    }

    /// As if read from the API server: a uid (so owner references are set) and a generation.
    pub fn stored(mut self, uid: &str, generation: i64) -> Self {
        self.cs.metadata.uid = Some(uid.to_owned());
        self.cs.metadata.generation = Some(generation);
        self
    }

    pub fn in_env(mut self, env: Environment) -> Self {
        self.cs.spec.environment = env;
        self
    }

    pub fn replicas(mut self, n: i32) -> Self {
        self.cs.spec.replicas = n;
        self
    }

    pub fn image(mut self, image: &str) -> Self {
        self.cs.spec.image = image.to_owned();
        self
    }

    /// A free-form `CHATGATE_*` key.
    pub fn config(mut self, key: &str, value: &str) -> Self {
        self.cs.spec.config.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Everything staging and production require: issuer, audience, the HS256 secret
    /// and the database URL as Secret references to `secret`.
    pub fn with_secret(mut self, secret: &str) -> Self {
        let r = |key: &str| SecretKeyRef {
            name: secret.to_owned(),
            key: key.to_owned(),
        };
        self.cs.spec.jwt.issuer = Some("https://issuer.example".to_owned());
        self.cs.spec.jwt.audience = Some("chatgate".to_owned());
        self.cs.spec.jwt.secret_ref = Some(r("jwt-secret"));
        self.cs.spec.database.url = None;
        self.cs.spec.database.url_secret_ref = Some(r("database-url"));
        self
    }

    /// The OpenAI-compatible provider with its key in `secret`/`key`.
    pub fn with_llm_key(mut self, secret: &str, key: &str) -> Self {
        self.cs.spec.llm.provider = crate::crd::LlmProvider::Openai;
        self.cs.spec.llm.api_key_secret_ref = Some(SecretKeyRef {
            name: secret.to_owned(),
            key: key.to_owned(),
        });
        self
    }

    pub fn startup(mut self, budget_seconds: i32, period_seconds: i32) -> Self {
        self.cs.spec.startup.budget_seconds = budget_seconds;
        self.cs.spec.startup.period_seconds = period_seconds;
        self
    }

    pub fn drain_seconds(mut self, s: i32) -> Self {
        self.cs.spec.rollout.drain_seconds = s;
        self
    }

    pub fn max_surge(mut self, n: i32) -> Self {
        self.cs.spec.rollout.max_surge = n;
        self
    }

    /// Compared with production ChatService `name` (same namespace) under `mode`.
    pub fn baseline(mut self, name: &str, mode: ParityMode) -> Self {
        self.cs.spec.parity = Some(ParitySpec {
            baseline: BaselineRef {
                name: name.to_owned(),
                namespace: None,
            },
            allowed_differences: Vec::new(),
            mode,
        });
        self
    }

    /// Pods only on nodes labelled `label=value` that tolerate taint `taint_key`.
    pub fn on_nodes(mut self, label: &str, value: &str, taint_key: &str) -> Self {
        self.cs.spec.scheduling = Some(crate::crd::SchedulingSpec {
            node_selector: [(label.to_owned(), value.to_owned())].into(),
            tolerations: vec![k8s_openapi::api::core::v1::Toleration {
                key: Some(taint_key.to_owned()),
                operator: Some("Exists".to_owned()),
                effect: Some("NoSchedule".to_owned()),
                ..Default::default()
            }],
        });
        self
    }

    pub fn build(self) -> ChatService {
        self.cs
    }
}
