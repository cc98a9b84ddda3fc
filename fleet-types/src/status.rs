//! The error body of both APIs: a Kubernetes `Status`, so that clients written for the
//! Kubernetes API read our errors without special cases.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The reasons the contract allows, each with its HTTP code.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Reason {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Timeout,
    Conflict,
    RequestEntityTooLarge,
    UnsupportedMediaType,
    Invalid,
    TooManyRequests,
    InternalError,
    ServiceUnavailable,
}

impl Reason {
    pub fn code(self) -> u16 {
        match self {
            Reason::BadRequest => 400,
            Reason::Unauthorized => 401,
            Reason::Forbidden => 403,
            Reason::NotFound => 404,
            Reason::MethodNotAllowed => 405,
            Reason::Timeout => 408,
            Reason::Conflict => 409,
            Reason::RequestEntityTooLarge => 413,
            Reason::UnsupportedMediaType => 415,
            Reason::Invalid => 422,
            Reason::TooManyRequests => 429,
            Reason::InternalError => 500,
            Reason::ServiceUnavailable => 503,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub kind: String,
    pub api_version: String,
    pub status: String,
    pub reason: Reason,
    pub message: String,
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
}

/// Every problem found, one cause each (`details.causes`), as Kubernetes lists field errors.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct StatusDetails {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<StatusCause>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct StatusCause {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub field: String,
    pub message: String,
}

impl Status {
    pub fn failure(reason: Reason, message: impl Into<String>) -> Self {
        Status {
            kind: "Status".into(),
            api_version: "v1".into(),
            status: "Failure".into(),
            reason,
            message: message.into(),
            code: reason.code(),
            details: None,
        }
    }

    /// A 422 `Invalid` listing every problem: the message joins them, the causes keep them apart.
    pub fn invalid(causes: Vec<StatusCause>) -> Self {
        let message = causes
            .iter()
            .map(|c| {
                if c.field.is_empty() {
                    c.message.clone()
                } else {
                    format!("{}: {}", c.field, c.message)
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        Status {
            details: Some(StatusDetails { causes }),
            ..Status::failure(Reason::Invalid, message)
        }
    }
}

/// The body of a successful delete, as Kubernetes answers it.
pub fn success(message: impl Into<String>) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Success",
        "message": message.into(),
        "code": 200,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_has_the_contract_shape() {
        let s = Status::failure(Reason::Invalid, "bad");
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Invalid","message":"bad","code":422})
        );
    }

    #[test]
    fn invalid_lists_every_cause() {
        let s = Status::invalid(vec![
            StatusCause {
                field: "spec.plan".into(),
                message: "plan is append only".into(),
            },
            StatusCause {
                field: String::new(),
                message: "ibuSpec is immutable".into(),
            },
        ]);
        assert_eq!(s.code, 422);
        assert_eq!(
            s.message,
            "spec.plan: plan is append only; ibuSpec is immutable"
        );
        assert_eq!(s.details.unwrap().causes.len(), 2);
    }
}
