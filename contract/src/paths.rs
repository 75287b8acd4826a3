//! Endpoint paths and ports of the service, shared so probes and routes cannot drift.

/// Liveness: the process and its runtime respond. Never depends on dependencies.
pub const HEALTH_LIVE: &str = "/health/live";
/// Startup: 200 only once every critical service exists.
pub const HEALTH_STARTUP: &str = "/health/startup";
/// Readiness: startup complete, not draining, dependencies usable.
pub const HEALTH_READY: &str = "/health/ready";
/// The aggregate health check for people and external checkers: the same answer
/// (status and report) as [`HEALTH_READY`], at the path checks usually expect.
pub const HEALTH: &str = "/health";
/// The chat WebSocket.
pub const WS: &str = "/ws";
/// Prometheus text exposition.
pub const METRICS: &str = "/metrics";

/// The container port the service listens on inside a pod.
pub const DEFAULT_PORT: u16 = 8080;
/// Where Kubernetes reads a container's termination message by default.
pub const DEFAULT_TERMINATION_LOG: &str = "/dev/termination-log";

/// WebSocket subprotocol the server selects for the `bearer.<jwt>` pair.
pub const SUBPROTOCOL_V1: &str = "chatgate.v1";
/// Prefix of the subprotocol entry that carries a raw JWT (`bearer.<jwt>`).
pub const SUBPROTOCOL_BEARER_PREFIX: &str = "bearer.";
/// Subprotocol the original chat frontend sends (selected by the server).
pub const SUBPROTOCOL_LEGACY: &str = "jwt-auth";
/// Prefix of the original frontend's token entry (`jwt.<base64url(jwt)>`).
pub const SUBPROTOCOL_LEGACY_TOKEN_PREFIX: &str = "jwt.";
/// Wire protocol version announced in the `connected` frame.
pub const PROTOCOL_VERSION: u32 = 1;
