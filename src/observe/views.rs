//! The body of `GET /queue`: built by `observe` from the state, rendered by `status_page`
//! too.

use serde::Serialize;

/// The running lab.
#[derive(Serialize)]
pub struct LabView {
    pub running: bool,
    pub topology: Option<String>,
    pub hash: Option<String>,
    pub devices: usize,
    pub device_names: Vec<String>,
    /// Each device's management address and type, from netlab's data.
    pub device_list: Vec<DeviceView>,
    pub started_at: Option<f64>,
    pub ref_count: u32,
    pub idle_since: Option<f64>,
}

/// What an operator wants to know of a device at a glance, from netlab's node data.
#[derive(Serialize)]
pub struct DeviceView {
    pub name: String,
    /// Management address: `mgmt.ipv4`, else `mgmt.ipv6`, else `ansible_host`.
    pub mgmt: Option<String>,
    /// netlab's device type: `device`, else `ansible_network_os` (`inspect --node` gives
    /// the latter only).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The image or box the device runs.
    #[serde(rename = "box")]
    pub image: Option<String>,
}

impl DeviceView {
    /// From one entry of a lab's device list (`{"name", "raw"}`).
    pub fn from_device(device: &serde_json::Value) -> Option<DeviceView> {
        let name = device.get("name")?.as_str()?.to_owned();
        let raw = &device["raw"];
        let text = |path: &[&str]| {
            let mut v = raw;
            for key in path {
                v = v.get(key)?;
            }
            v.as_str().map(str::to_owned)
        };
        Some(DeviceView {
            name,
            mgmt: text(&["mgmt", "ipv4"])
                .or_else(|| text(&["mgmt", "ipv6"]))
                .or_else(|| text(&["ansible_host"])),
            kind: text(&["device"]).or_else(|| text(&["ansible_network_os"])),
            image: text(&["box"]),
        })
    }
}

/// A netlab command running now.
#[derive(Serialize)]
pub struct Operation {
    pub command: &'static str,
    pub since: f64,
    pub session: Option<String>,
}

/// One session, its id cut to an 8-character prefix.
#[derive(Serialize)]
pub struct SessionView {
    pub position: usize,
    pub status: &'static str,
    pub id: String,
    pub client_name: Option<String>,
    pub owner: Option<String>,
    pub address: Option<String>,
    pub user_agent: Option<String>,
    pub created_at: f64,
    pub active_since: Option<f64>,
    pub last_seen_ago: f64,
    pub holds_lab: bool,
    pub acquiring: bool,
}

/// The whole view.
#[derive(Serialize)]
pub struct QueueView {
    pub time: f64,
    pub version: &'static str,
    pub active_timeout: f64,
    pub waiting_timeout: f64,
    pub lab: LabView,
    pub operation: Option<Operation>,
    pub teardowns_pending: usize,
    pub total: usize,
    pub truncated: bool,
    pub sessions: Vec<SessionView>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn devices_as_netlab_describes_them() {
        // What `netlab inspect --node` printed for a clab frr node (netlab 26.10).
        let real = json!({"name": "a1", "raw": {
            "box": "quay.io/frrouting/frr:10.7.1",
            "mgmt": {"ifname": "eth0", "ipv4": "192.168.121.101", "mac": "ca:fe:00:01:00:00"},
            "ansible_host": "clab-labb-a1", "ansible_network_os": "frr"}});
        let d = DeviceView::from_device(&real).unwrap();
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({"name": "a1", "mgmt": "192.168.121.101", "type": "frr",
                   "box": "quay.io/frrouting/frr:10.7.1"})
        );
        let sparse = json!({"name": "h1", "raw": {"device": "linux",
            "mgmt": {"ipv6": "2001:db8::1"}}});
        let d = DeviceView::from_device(&sparse).unwrap();
        assert_eq!(
            (d.mgmt.as_deref(), d.kind.as_deref(), d.image.as_deref()),
            (Some("2001:db8::1"), Some("linux"), None)
        );
        let odd = json!({"name": "x", "raw": {"mgmt": {"ipv4": 7}, "box": ["a"]}});
        let d = DeviceView::from_device(&odd).unwrap();
        assert_eq!((d.mgmt, d.kind, d.image), (None, None, None));
        assert!(DeviceView::from_device(&json!({"raw": {}})).is_none());
    }
}
