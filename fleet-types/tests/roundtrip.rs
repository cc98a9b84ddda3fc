//! The sample manifests deserialize into the typed resources and serialize back unchanged.

use fleet_types::{Action, ImageBasedGroupUpgrade, ImageBasedUpgrade, Stage};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T: DeserializeOwned + Serialize>(
    yaml: &str,
) -> (T, serde_json::Value, serde_json::Value) {
    let original: serde_json::Value = serde_yaml::from_str(yaml).expect("fixture is YAML");
    let typed: T = serde_yaml::from_str(yaml).expect("fixture deserializes");
    let back = serde_json::to_value(&typed).expect("serializes");
    (typed, original, back)
}

#[test]
fn talm_ibgu_manifest_round_trips() {
    let (ibgu, original, back) =
        round_trip::<ImageBasedGroupUpgrade>(include_str!("../fixtures/ibgu-talm.yaml"));
    assert_eq!(original, back);
    assert_eq!(
        ibgu.spec.plan[1].actions,
        vec![Action::Upgrade, Action::FinalizeUpgrade]
    );
    assert_eq!(ibgu.spec.plan[1].rollout_strategy.timeout_minutes(), 240);
    assert_eq!(ibgu.spec.plan[0].rollout_strategy.timeout_minutes(), 2400);
    assert_eq!(ibgu.metadata.namespace.as_deref(), Some("default"));
}

#[test]
fn full_ibu_round_trips() {
    let (ibu, original, back) =
        round_trip::<ImageBasedUpgrade>(include_str!("../fixtures/ibu-full.yaml"));
    assert_eq!(original, back);
    let status = ibu.status.as_ref().unwrap();
    assert_eq!(ibu.spec.stage, Stage::Upgrade);
    assert_eq!(status.valid_next_stages, vec![Stage::Rollback]);
    assert_eq!(
        status.current().unwrap().message,
        "Restoring Application Data"
    );
    assert_eq!(status.history[0].phases.len(), 2);
}

#[test]
fn new_idle_ibu_serializes_minimal() {
    let ibu = ImageBasedUpgrade::new("upgrade", Default::default());
    let v = serde_json::to_value(&ibu).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "apiVersion": "lca.openshift.io/v1",
            "kind": "ImageBasedUpgrade",
            "metadata": {"name": "upgrade"},
            "spec": {"stage": "Idle"}
        })
    );
}

#[test]
fn unknown_stage_and_action_are_rejected() {
    let err = serde_json::from_str::<Stage>("\"Finalize\"").unwrap_err();
    assert!(
        err.to_string().contains("unknown variant `Finalize`"),
        "{err}"
    );
    let err = serde_json::from_str::<Action>("\"Finalise\"").unwrap_err();
    assert!(err.to_string().contains("unknown variant"), "{err}");
}

/// The agent sends reports borrowed from its state; the hub reads them as `StatusReport`.
/// Both forms write the same bytes, with and without an agent id.
#[test]
fn a_borrowed_status_report_is_written_as_a_status_report() {
    use fleet_types::messages::{StatusReport, StatusReportRef};
    let ibu: ImageBasedUpgrade =
        serde_yaml::from_str(include_str!("../fixtures/ibu-full.yaml")).unwrap();
    for agent_id in ["run-1", ""] {
        let borrowed = StatusReportRef {
            sequence: 7,
            agent_id,
            ibu: &ibu,
        };
        let owned = StatusReport {
            sequence: 7,
            agent_id: agent_id.to_string(),
            ibu: ibu.clone(),
        };
        let bytes = serde_json::to_vec(&borrowed).unwrap();
        assert_eq!(
            bytes,
            serde_json::to_vec(&owned).unwrap(),
            "agent id {agent_id:?}"
        );
        assert_eq!(
            serde_json::from_slice::<StatusReport>(&bytes).unwrap(),
            owned
        );
    }
}
