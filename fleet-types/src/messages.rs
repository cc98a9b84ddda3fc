//! Messages between the spoke agent and the hub (`/v1/clusters/register`,
//! `/v1/clusters/{name}/status`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ibu::ImageBasedUpgrade;

/// `POST /v1/clusters/register`, authenticated with the join token (or the cluster's
/// credential, to register a renewed certificate or a new endpoint).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    pub name: String,
    /// Base URL of the agent's API as the hub should call it.
    pub endpoint: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Identifies one agent's state (its state directory); a new id restarts the report
    /// sequence on the hub side.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_id: String,
    /// The lowercase hex SHA-256 of the agent's serving certificate (DER) when it serves
    /// TLS: the hub pushes only to an endpoint presenting this certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_sha256: Option<String>,
}

/// Answer to a registration: the credential the agent presents on its reports, and the hub
/// presents on its pushes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    pub name: String,
    pub credential: String,
    /// When the hub stops accepting the credential (`--cluster-credential-ttl` after it was
    /// issued); the agent renews it at two thirds of its life. Absent: it does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `POST /v1/clusters/{name}/status`: the agent's IBU after a change. The hub ignores a
/// report whose sequence is not greater than the last one it stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub sequence: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_id: String,
    pub ibu: ImageBasedUpgrade,
}

/// A `StatusReport` as the agent sends it: borrowed from the agent's state rather than copied
/// out of it. Same wire form (a test holds the two together).
#[derive(Serialize, Clone, Copy, Debug)]
#[serde(rename_all = "camelCase")]
pub struct StatusReportRef<'a> {
    pub sequence: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub agent_id: &'a str,
    pub ibu: &'a ImageBasedUpgrade,
}
