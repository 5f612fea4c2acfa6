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

/// The agent as cloud-init's `gz+b64` encoding carries it (a third of its size: user
/// data is limited to 32 KiB).
fn packed_agent() -> String {
    use base64::Engine as _;
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(AGENT.as_bytes()).expect("writing to memory");
    base64::engine::general_purpose::STANDARD.encode(gz.finish().expect("writing to memory"))
}

/// The user data for a machine.
pub fn cloud_config(cfg: &AgentConfig) -> String {
    let config = serde_json::to_string(cfg).expect("serializable");
    let doc = json!({
        "package_update": false,
        "write_files": [
            {"path": AGENT_PATH, "permissions": "0755", "encoding": "gz+b64", "content": packed_agent()},
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
