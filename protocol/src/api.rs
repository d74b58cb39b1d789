//! The VMM's control socket: a Unix socket where the runtime asks a running
//! VM to pause, resume, stop, write a snapshot, or bind a TAP device to
//! one of its network slots.
//!
//! One JSON object per line each way: `{"action":"pause"}` is answered
//! `{"ok":true}` once every vCPU has stopped, or `{"ok":false,"error":"..."}`.
//! The VMM serves it (`husk_vmm::api`); the runtime is its client.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What the runtime can ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ApiRequest {
    /// Stop every vCPU where it is (the guest does not notice).
    Pause,
    /// Let them run again.
    Resume,
    /// End the VM now; the VMM exits 0 and removes its socket.
    Stop,
    /// Stop every vCPU, write a snapshot of the whole VM to the directory
    /// `dir` (made if missing) and stay paused: `resume` goes on, `stop`
    /// ends the VM. Open vsock connections are recorded, not kept: a guest
    /// restored from it is told they were reset. With two descriptors on
    /// the same message (SCM_RIGHTS: `dir/state`, then `dir/memory`, made
    /// by the sender), the VMM writes into them instead: a VMM in its jail
    /// sees no directory but its own (docs/security.md).
    Snapshot {
        /// Where the snapshot goes (with descriptors: what names them).
        dir: PathBuf,
    },
    /// Bind the TAP device whose descriptor comes with this request (one
    /// SCM_RIGHTS descriptor on the same message) to the guest's network
    /// slot `slot` (0-based: the guest's `eth<slot>` in slot order). The
    /// TAP was opened `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; the VMM never
    /// opens `/dev/net/tun` itself.
    AttachNet {
        /// The network slot.
        slot: u8,
    },
    /// Unbind network slot `slot`: its frames are dropped until a TAP is
    /// bound again.
    DetachNet {
        /// The network slot.
        slot: u8,
    },
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiResponse {
    /// Whether it was done.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

impl ApiResponse {
    /// Done.
    pub fn ok() -> Self {
        Self {
            ok: true,
            error: None,
        }
    }

    /// Not done, and why.
    pub fn error(why: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(why.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_keep_their_wire_form() {
        let json = serde_json::to_string(&ApiRequest::Snapshot { dir: "/s".into() }).unwrap();
        assert_eq!(json, r#"{"action":"snapshot","dir":"/s"}"#);
        assert_eq!(
            serde_json::from_str::<ApiRequest>(r#"{"action":"pause"}"#).unwrap(),
            ApiRequest::Pause
        );
        assert_eq!(
            serde_json::to_string(&ApiResponse::ok()).unwrap(),
            r#"{"ok":true}"#
        );
        assert!(serde_json::from_str::<ApiRequest>(r#"{"action":"reboot"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&ApiRequest::AttachNet { slot: 1 }).unwrap(),
            r#"{"action":"attach_net","slot":1}"#
        );
    }
}
