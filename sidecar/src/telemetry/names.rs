//! Every metric the sidecar exports: its name and its help text. A leaf: the modules that record a metric
//! import its name from here, and nothing here imports them.

/// Requests the sidecar receives, until their response body ends.
pub const SERVER_DURATION: &str = "http_server_request_duration_seconds";

/// Each upstream attempt, until the upstream's response head.
pub const CLIENT_DURATION: &str = "http_client_request_duration_seconds";

/// Requests being served now.
pub const ACTIVE_REQUESTS: &str = "http_server_active_requests";

/// Policy reloads by result (`applied`, `unchanged`, `rejected`).
pub const POLICY_RELOADS: &str = "sidecar_policy_reloads_total";

/// The active policy version.
pub const POLICY_VERSION: &str = "sidecar_policy_version";

/// Always 1, labelled with the build's version.
pub const BUILD_INFO: &str = "sidecar_build_info";

/// Breaker state by service (0 closed, 1 open, 2 half-open).
pub const BREAKER_STATE: &str = "sidecar_circuit_breaker_state";

/// Endpoint breaker state by service and endpoint.
pub const ENDPOINT_BREAKER_STATE: &str = "sidecar_endpoint_breaker_state";

/// Breaker transitions by service, scope (`service` or `endpoint`) and the state entered.
pub const BREAKER_TRANSITIONS: &str = "sidecar_circuit_breaker_transitions_total";

/// Retries by service and reason.
pub const RETRIES: &str = "sidecar_retries_total";

/// Retries the policy called for but did not make, by service and reason (`budget_exhausted`, ...).
pub const RETRIES_SKIPPED: &str = "sidecar_retries_skipped_total";

/// Requests refused by a rate limit, by service.
pub const RATE_LIMITED: &str = "sidecar_rate_limited_total";

/// Requests refused by a concurrency limit, by service and reason.
pub const OVERLOADED: &str = "sidecar_overloaded_total";

/// Requests refused because a breaker was open, by service.
pub const CIRCUIT_OPEN: &str = "sidecar_circuit_open_total";

/// Seconds until a certificate expires (negative once it has): this sidecar's, and the CA bundle's soonest.
pub const CERT_EXPIRY: &str = "sidecar_mesh_certificate_expiry_seconds";

/// Certificate files read anew, by result (`applied`, `rejected`).
pub const CERT_RELOADS: &str = "sidecar_mesh_certificate_reloads_total";

/// Health check results by service and result (`healthy`, `unhealthy`: transitions only).
pub const HEALTH_TRANSITIONS: &str = "sidecar_health_check_transitions_total";

/// Spans dropped because the export queue was full.
pub const SPANS_DROPPED: &str = "sidecar_trace_spans_dropped_total";

/// Spans handed to the exporter, by result.
pub const SPANS_EXPORTED: &str = "sidecar_trace_spans_exported_total";

/// Discovery results by service and result (`changed`, `unchanged`, `failed`).
pub const DISCOVERY_UPDATES: &str = "sidecar_discovery_updates_total";

/// Endpoints a service has now.
pub const SERVICE_ENDPOINTS: &str = "sidecar_service_endpoints";

/// Counts headers the mesh hop removed, by direction (`inbound`, `outbound`) and reason (`underscore`).
pub const HEADERS_DROPPED: &str = "sidecar_headers_dropped_total";

pub const ACCESS_LOG_DROPPED: &str = "sidecar_access_log_dropped_total";

/// Traffic copies sent, by outcome.
pub const SHADOW_SENT: &str = "sidecar_shadow_requests_total";

/// Traffic copies dropped before or while sent, by reason.
pub const SHADOW_DROPPED: &str = "sidecar_shadow_dropped_total";

/// Each traffic copy, from hand-off until its response body ended.
pub const SHADOW_DURATION: &str = "sidecar_shadow_duration_seconds";

/// Traffic copies whose status class differed from the primary's.
pub const SHADOW_MISMATCHES: &str = "sidecar_shadow_mismatches_total";

/// Fan-out requests to one target of a group, by outcome.
pub const FANOUT_SENT: &str = "sidecar_fanout_requests_total";

/// Each fan-out request to one target, until its answer (or failure) was known.
pub const FANOUT_DURATION: &str = "sidecar_fanout_duration_seconds";

/// Help texts, as Prometheus shows them.
pub fn describe() {
    use metrics::Unit;
    metrics::describe_histogram!(
        SERVER_DURATION,
        Unit::Seconds,
        "Requests the sidecar received, from arrival until the response body ended."
    );
    metrics::describe_histogram!(
        CLIENT_DURATION,
        Unit::Seconds,
        "Upstream attempts, from sending until the response head (or the failure)."
    );
    metrics::describe_gauge!(ACTIVE_REQUESTS, "Requests being served now.");
    metrics::describe_counter!(
        POLICY_RELOADS,
        "Policy reloads by result (applied, unchanged, rejected)."
    );
    metrics::describe_gauge!(POLICY_VERSION, "The version of the policy serving now.");
    metrics::describe_gauge!(BUILD_INFO, "Always 1; the labels name the build.");
    metrics::describe_gauge!(
        BREAKER_STATE,
        "Circuit breaker state per service: 0 closed, 1 open, 2 half-open."
    );
    metrics::describe_gauge!(
        ENDPOINT_BREAKER_STATE,
        "Circuit breaker state per service endpoint: 0 closed, 1 open, 2 half-open."
    );
    metrics::describe_counter!(
        BREAKER_TRANSITIONS,
        "Circuit breaker transitions by the state entered."
    );
    metrics::describe_counter!(
        RETRIES,
        "Retries made, by the reason of the failed attempt."
    );
    metrics::describe_counter!(
        RETRIES_SKIPPED,
        "Retries the conditions called for but not made (budget_exhausted, body_not_replayable, method, deadline, retry_after_too_long, attempts)."
    );
    metrics::describe_counter!(RATE_LIMITED, "Requests refused with 429 by a rate limit.");
    metrics::describe_counter!(
        OVERLOADED,
        "Requests refused with 503 by a concurrency limit (queue_full, queue_timeout, deadline)."
    );
    metrics::describe_counter!(
        CIRCUIT_OPEN,
        "Requests refused with 503 because the circuit breaker was open."
    );
    metrics::describe_counter!(
        DISCOVERY_UPDATES,
        "Service discovery answers by result (changed, unchanged, failed)."
    );
    metrics::describe_gauge!(SERVICE_ENDPOINTS, "Endpoints each service has now.");
    metrics::describe_gauge!(
        CERT_EXPIRY,
        metrics::Unit::Seconds,
        "Seconds until a mesh certificate expires (negative once it has); certificate=identity|ca."
    );
    metrics::describe_counter!(
        CERT_RELOADS,
        "Mesh certificate files read anew after a change, by result (applied, rejected)."
    );
    metrics::describe_counter!(
        HEALTH_TRANSITIONS,
        "Endpoints marked healthy or unhealthy by active health checks."
    );
    metrics::describe_counter!(
        SPANS_DROPPED,
        "Spans dropped because the export queue was full."
    );
    metrics::describe_counter!(
        SPANS_EXPORTED,
        "Spans handed to the OTLP exporter, by result (ok, error)."
    );
    metrics::describe_counter!(
        ACCESS_LOG_DROPPED,
        "Access log lines dropped because the writer fell behind."
    );
    metrics::describe_counter!(
        SHADOW_SENT,
        "Traffic copies sent, by outcome (ok: any response, failed: no response within the copy's timeout)."
    );
    metrics::describe_counter!(
        SHADOW_DROPPED,
        "Traffic copies dropped, by reason (queue_full, concurrency, circuit_open, no_endpoint, slow, body_error)."
    );
    metrics::describe_histogram!(
        SHADOW_DURATION,
        Unit::Seconds,
        "Traffic copies, from hand-off until the response body ended."
    );
    metrics::describe_counter!(
        SHADOW_MISMATCHES,
        "Traffic copies whose status class (2xx, 4xx, ...) differed from the primary's."
    );
    metrics::describe_counter!(
        FANOUT_SENT,
        "Fan-out requests to one target of a group, by outcome (ok: a 2xx; failed; timeout; cancelled: another target won first_success; queue_full: refused in async mode)."
    );
    metrics::describe_histogram!(
        FANOUT_DURATION,
        Unit::Seconds,
        "Fan-out requests to one target, until its response head or its failure."
    );
}
