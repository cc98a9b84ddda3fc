//! Strict field validation, as the Kubernetes API server does it (`fieldValidation`): a field
//! the IBGU's schema does not declare is refused, each one named by where it is, instead of
//! being dropped while the user believes it took effect (`rolloutStrategy.timout`).

use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderValue, header};
use fleet_types::status::StatusCause;
use fleet_types::{Reason, Status};
use serde_json::Value;

use super::ApiError;

/// What to do with unknown fields (`?fieldValidation=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    /// Refuse the request, naming every unknown field (the default).
    Strict,
    /// Accept it, dropping them, with a `Warning` header for each.
    Warn,
    /// Accept it, dropping them.
    Ignore,
}

impl FieldValidation {
    pub fn parse(given: Option<&str>) -> Result<FieldValidation, ApiError> {
        match given {
            None | Some("Strict") => Ok(FieldValidation::Strict),
            Some("Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some(other) => Err(ApiError::new(
                Reason::BadRequest,
                format!("fieldValidation={other}: use Strict, Warn or Ignore"),
            )),
        }
    }
}

/// The IBGU's schema, as its CRD declares it.
fn ibgu_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        crate::crd::ibgu()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    })
}

/// Every field of an IBGU document its schema does not declare: (path of the field, message).
pub fn unknown_ibgu_fields(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    walk(ibgu_schema(), doc, "", &mut out);
    out
}

fn walk(schema: &Value, value: &Value, path: &str, out: &mut Vec<(String, String)>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true) {
        return;
    }
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            let additional = &schema["additionalProperties"];
            for (key, v) in map {
                let inner = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                // Every object has these; a CRD's schema leaves them to the API server.
                if path.is_empty() && ["apiVersion", "kind", "metadata"].contains(&key.as_str()) {
                    continue;
                }
                if let Some(s) = properties.and_then(|p| p.get(key)) {
                    walk(s, v, &inner, out);
                } else if additional.is_object() {
                    walk(additional, v, &inner, out);
                } else if properties.is_some() && additional != &Value::Bool(true) {
                    let within = if path.is_empty() {
                        String::new()
                    } else {
                        format!(" in {path}")
                    };
                    out.push((inner, format!("unknown field \"{key}\"{within}")));
                }
            }
        }
        Value::Array(items) if schema["items"].is_object() => {
            for (i, v) in items.iter().enumerate() {
                walk(&schema["items"], v, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Applies the chosen validation to the unknown fields found: `Err` with a 422 naming every
/// one (Strict), or the `Warning` headers to answer with (Warn).
pub fn apply(mode: FieldValidation, unknown: Vec<(String, String)>) -> Result<HeaderMap, ApiError> {
    let mut warnings = HeaderMap::new();
    if unknown.is_empty() || mode == FieldValidation::Ignore {
        return Ok(warnings);
    }
    if mode == FieldValidation::Strict {
        let causes = unknown
            .into_iter()
            .map(|(field, message)| StatusCause { field, message })
            .collect();
        return Err(ApiError::from(Status::invalid(causes)));
    }
    for (_, message) in unknown {
        let text = format!("299 - {}", serde_json::Value::String(message));
        if let Ok(v) = HeaderValue::from_str(&text) {
            warnings.append(header::WARNING, v);
        }
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_unknown_field_is_named_by_where_it_is() {
        let doc = json!({"apiVersion": "lcm.openshift.io/v1alpha1", "kind": "ImageBasedGroupUpgrade",
            "metadata": {"name": "x", "anything": 1},
            "spec": {"bogusField": true,
                "clusterLabelSelectors": [{"matchLabels": {"free": "form"}}],
                "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": "i", "digest": "no"}},
                "plan": [{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 1, "timout": 30}}]}});
        assert_eq!(
            unknown_ibgu_fields(&doc),
            vec![
                (
                    "spec.bogusField".to_string(),
                    "unknown field \"bogusField\" in spec".to_string()
                ),
                (
                    "spec.ibuSpec.seedImageRef.digest".to_string(),
                    "unknown field \"digest\" in spec.ibuSpec.seedImageRef".to_string()
                ),
                (
                    "spec.plan[0].rolloutStrategy.timout".to_string(),
                    "unknown field \"timout\" in spec.plan[0].rolloutStrategy".to_string()
                ),
            ]
        );
    }

    #[test]
    fn strict_refuses_warn_warns_ignore_ignores() {
        let found = || {
            vec![(
                "spec.x".to_string(),
                "unknown field \"x\" in spec".to_string(),
            )]
        };
        let refused = apply(FieldValidation::Strict, found()).unwrap_err();
        assert_eq!(refused.status().code, 422);
        assert_eq!(
            refused.status().message,
            "spec.x: unknown field \"x\" in spec"
        );
        let warnings = apply(FieldValidation::Warn, found()).unwrap();
        assert_eq!(
            warnings[header::WARNING],
            "299 - \"unknown field \\\"x\\\" in spec\""
        );
        assert!(apply(FieldValidation::Ignore, found()).unwrap().is_empty());
        assert!(FieldValidation::parse(Some("Loose")).is_err());
    }
}
