//! The cloud-init user data of preview servers: a `#cloud-config` that installs the
//! Wakegate agent, its configuration and a systemd unit that runs it on every boot
//! (first boot, power-on after `stop`, and servers made from a hibernation snapshot).
//!
//! The document is written as JSON, which YAML parsers read as YAML, so nothing in it
//! needs YAML quoting rules; the agent travels base64-encoded.

use serde::Serialize;
use serde_json::json;

/// The agent itself: Python 3 standard library only (Ubuntu and Debian images have it).
pub const AGENT: &str = include_str!("agent.py");
pub const AGENT_PATH: &str = "/usr/local/lib/wakegate/agent.py";
pub const AGENT_CONFIG: &str = "/etc/wakegate/agent.json";
pub const UNIT_PATH: &str = "/etc/systemd/system/wakegate-agent.service";

/// What the agent is told.
#[derive(Clone, Debug, Serialize)]
pub struct AgentConfig {
    /// The control plane's base URL.
    pub control: String,
    pub machine: String,
    /// Bearer token for this machine only (`wakegate_core::sign::machine_token`).
    pub token: String,
    /// Where the checkout and the app live on the machine.
    pub root: String,
    /// The port the app listens on.
    pub port: u16,
}

const UNIT: &str = "[Unit]
Description=Wakegate preview agent
Wants=network-online.target
After=network-online.target docker.service

[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/wakegate/agent.py /etc/wakegate/agent.json
Restart=on-failure
RestartSec=2
KillMode=control-group

[Install]
WantedBy=multi-user.target
";

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The user data for a machine.
pub fn cloud_config(cfg: &AgentConfig) -> String {
    let config = serde_json::to_string(cfg).expect("serializable");
    let doc = json!({
        "package_update": false,
        "write_files": [
            {"path": AGENT_PATH, "permissions": "0755", "encoding": "b64", "content": b64(AGENT.as_bytes())},
            {"path": AGENT_CONFIG, "permissions": "0600", "content": config},
            {"path": UNIT_PATH, "permissions": "0644", "content": UNIT},
        ],
        "runcmd": [
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", "wakegate-agent.service"],
        ],
    });
    format!("#cloud-config\n{doc}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn fits_hetzners_user_data_limit() {
        let ud = cloud_config(&AgentConfig {
            control: "https://control.example.com:8443".into(),
            machine: "wg-0123456789ab".into(),
            token: "f".repeat(64),
            root: "/srv/wakegate".into(),
            port: 80,
        });
        assert!(ud.starts_with("#cloud-config\n"));
        assert!(ud.len() < 32 * 1024, "user data is {} bytes", ud.len());
        let doc: serde_json::Value = serde_json::from_str(&ud["#cloud-config\n".len()..]).unwrap();
        assert_eq!(doc["write_files"][1]["path"], AGENT_CONFIG);
    }
}
