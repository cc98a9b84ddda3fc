//! The cluster labels the hub maintains (`lcm.openshift.io/ibgu-<action>-completed|failed`)
//! and the annotations both sides read.

use crate::ibgu::Action;

/// Prefix of every label the hub writes on clusters.
pub const IBGU_LABEL_PREFIX: &str = "lcm.openshift.io/ibgu-";

/// On a cluster: it is among a plan item's canaries first (`rolloutStrategy.canaryClusters`).
pub const CANARY_LABEL: &str = "lcm.openshift.io/canary";

/// On the IBU: warnings of the extra-manifest validation, joined with `; `.
pub const EXTRA_MANIFEST_WARNING_ANNOTATION: &str =
    "extra-manifest.lca.openshift.io/validation-warning";
/// On the IBU: added by a person after a manual cleanup; makes the agent retry it.
pub const MANUAL_CLEANUP_DONE_ANNOTATION: &str = "lca.openshift.io/manual-cleanup-done";
/// On the IBU: `Disabled` turns off the init-monitor watchdog.
pub const AUTO_ROLLBACK_INIT_MONITOR: &str =
    "auto-rollback-on-failure.lca.openshift.io/init-monitor";
/// On the IBU: `Disabled` turns off rollback on post-reboot configuration failures.
pub const AUTO_ROLLBACK_POST_REBOOT_CONFIG: &str =
    "auto-rollback-on-failure.lca.openshift.io/post-reboot-config";
/// On the IBU: `Disabled` turns off rollback on failures of the final upgrade steps.
pub const AUTO_ROLLBACK_UPGRADE_COMPLETION: &str =
    "auto-rollback-on-failure.lca.openshift.io/upgrade-completion";
/// On the IBU: `Disabled` turns off the removal of unused images before Prep pulls.
pub const IMAGE_CLEANUP_ON_PREP: &str = "image-cleanup.lca.openshift.io/on-prep";
/// On the IBU: the container storage usage, in percent, above which Prep removes unused
/// images (default [`IMAGE_CLEANUP_THRESHOLD_DEFAULT`]).
pub const IMAGE_CLEANUP_THRESHOLD: &str =
    "image-cleanup.lca.openshift.io/disk-usage-threshold-percent";
pub const IMAGE_CLEANUP_THRESHOLD_DEFAULT: u8 = 50;
/// The value of the auto-rollback annotations that turns a part off.
pub const DISABLED: &str = "Disabled";

/// `lcm.openshift.io/ibgu-<action>-completed`.
pub fn completed_label(action: Action) -> String {
    format!(
        "{IBGU_LABEL_PREFIX}{}-completed",
        action.as_str().to_lowercase()
    )
}

/// `lcm.openshift.io/ibgu-<action>-failed`.
pub fn failed_label(action: Action) -> String {
    format!(
        "{IBGU_LABEL_PREFIX}{}-failed",
        action.as_str().to_lowercase()
    )
}

/// Whether `key` is one of the hub's labels: `lcm.openshift.io/ibgu-<letters>-(completed|failed)`.
/// Finalize and abort actions remove every such label.
pub fn is_ibgu_label(key: &str) -> bool {
    let Some(rest) = key.strip_prefix(IBGU_LABEL_PREFIX) else {
        return false;
    };
    let action = rest
        .strip_suffix("-completed")
        .or_else(|| rest.strip_suffix("-failed"));
    matches!(action, Some(a) if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphabetic()))
}

/// Whether an IBGU annotation is copied onto each spoke's IBU.
pub fn is_copied_to_spoke(annotation_key: &str) -> bool {
    annotation_key.contains("lca.openshift.io")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_use_the_lower_case_action() {
        assert_eq!(
            completed_label(Action::Prep),
            "lcm.openshift.io/ibgu-prep-completed"
        );
        assert_eq!(
            failed_label(Action::AbortOnFailure),
            "lcm.openshift.io/ibgu-abortonfailure-failed"
        );
        assert_eq!(
            completed_label(Action::FinalizeUpgrade),
            "lcm.openshift.io/ibgu-finalizeupgrade-completed"
        );
    }

    #[test]
    fn ibgu_label_pattern() {
        for a in Action::ALL {
            assert!(is_ibgu_label(&completed_label(a)));
            assert!(is_ibgu_label(&failed_label(a)));
        }
        assert!(!is_ibgu_label("lcm.openshift.io/ibgu-prep-done"));
        assert!(!is_ibgu_label("lcm.openshift.io/ibgu--completed"));
        assert!(!is_ibgu_label("lcm.openshift.io/ibgu-pr3p-completed"));
        assert!(!is_ibgu_label("name"));
    }

    #[test]
    fn annotations_copied_to_spokes() {
        assert!(is_copied_to_spoke(AUTO_ROLLBACK_INIT_MONITOR));
        assert!(is_copied_to_spoke("lca.openshift.io/target-ocp-version"));
        assert!(!is_copied_to_spoke(
            "kubectl.kubernetes.io/last-applied-configuration"
        ));
    }
}
