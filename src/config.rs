//! Settings from a source of strings.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use wakegate_core::sign::Key;

pub const DEFAULT_EDGE_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_WAKER_ADDR: &str = "127.0.0.1:7001";
pub const DEFAULT_DATA_DIR: &str = ".wakegate";
pub const DEFAULT_PREVIEW_BASE: &str = "localhost";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("{0} is required")]
    Missing(&'static str),
}

/// Where settings come from.
pub trait Source {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct Env;

impl Source for Env {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

/// Every setting of every part.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub edge_addr: SocketAddr,
    pub waker_addr: SocketAddr,
    /// How the edge reaches waker.
    pub waker_url: String,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    pub preview_base: String,
    /// `{label}` is replaced; default `http://{label}.<base>:<edge port>`.
    pub preview_url_template: Option<String>,
    pub edge_key: Option<Key>,
    pub csrf_key: Option<Key>,
    pub origin_key: Option<Key>,
    pub operator_token: Option<String>,
    /// Where `/metrics` is served (`WAKEGATE_METRICS_ADDR`); off when unset.
    pub metrics_addr: Option<SocketAddr>,
    pub sweep_every: Duration,
    /// How long a stopping process (SIGTERM, Ctrl-C) lets requests and jobs in flight
    /// finish (`WAKEGATE_SHUTDOWN_GRACE_SECS`, default 20).
    pub shutdown_grace: Duration,
    pub lease: Duration,
    pub orphan_grace: Duration,
    /// Cloud API requests the reconciler's listings may spend an hour.
    pub cloud_requests_per_hour: usize,
    /// The usual gap between the reconciler's cloud listings.
    pub cloud_list_every: Duration,
    pub liveness_every: Duration,
    pub max_builds: usize,
    pub max_quick_jobs: usize,
    /// Whether projects' base dumps are baked into database images previews clone
    /// (`WAKEGATE_DB_IMAGES`, default true; false: every preview imports its dump).
    pub db_images: bool,
    /// DNS servers that verify org domains (`WAKEGATE_DNS_SERVERS`, comma-separated
    /// `ip:port`); empty: the system's resolvers.
    pub dns_servers: Vec<SocketAddr>,
    /// How long a verified domain's record may be missing before its bases are suspended.
    pub domain_grace: Duration,
    /// How often org domains are re-checked and custom names repaired.
    pub domain_recheck_every: Duration,
    /// What `*.<base>` records point at (default: the preview base).
    pub custom_host_target: Option<String>,
    /// Cloudflare for SaaS (custom hostnames), when a zone and token are set.
    pub saas: Option<wakegate_waker::saas::SaasConfig>,
    /// How often the forge inbox, comments and reconciler run.
    pub forge: wakegate_waker::forge::ForgeSettings,
    pub route_ttl: Duration,
    pub hold_timeout: Duration,
    pub activity_every: Duration,
    /// The native edge's limits, timeouts and forwarding policy.
    pub edge: EdgeSettings,
    /// Where previews run: `local` (child processes on this machine) or `hetzner`.
    pub backend: BackendKind,
    pub hetzner: HetznerConfig,
    /// The bucket database dumps are kept in (`WAKEGATE_S3_*`), when set.
    pub s3: Option<wakegate_db::s3::S3Config>,
}

/// `WAKEGATE_EDGE_*`-style settings of the native edge (defaults are the edge crate's).
#[derive(Clone, Debug)]
pub struct EdgeSettings {
    pub negative_ttl: Duration,
    pub cache_capacity: usize,
    /// `X-Forwarded-Proto`: `http`, or `https` behind a TLS terminator.
    pub scheme: &'static str,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub max_uri: usize,
    pub max_head: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_per_ip: usize,
    pub busy_poll: Duration,
}

impl EdgeSettings {
    fn from_source(src: &dyn Source) -> Result<EdgeSettings, ConfigError> {
        use wakegate_edge::{cache, native, pipeline};
        let secs_default = |d: Duration| d.as_secs_f64();
        Ok(EdgeSettings {
            negative_ttl: secs(src, "WAKEGATE_NEGATIVE_CACHE_SECS", cache::DEFAULT_NEGATIVE_TTL_MS as f64 / 1000.0)?,
            cache_capacity: count(src, "WAKEGATE_ROUTE_CACHE_MAX", cache::DEFAULT_CAPACITY, 1..=10_000_000)?,
            scheme: match src.get("WAKEGATE_EDGE_SCHEME").as_deref() {
                None | Some("http") => "http",
                Some("https") => "https",
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        key: "WAKEGATE_EDGE_SCHEME",
                        reason: format!("{other:?}: expected http or https"),
                    })
                }
            },
            trusted_proxies: list(src, "WAKEGATE_TRUSTED_PROXIES")
                .unwrap_or_default()
                .iter()
                .map(|n| {
                    n.parse::<ipnet::IpNet>()
                        .or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .map_err(|e| ConfigError::Invalid {
                            key: "WAKEGATE_TRUSTED_PROXIES",
                            reason: format!("{n:?}: {e}"),
                        })
                })
                .collect::<Result<_, _>>()?,
            max_uri: count(src, "WAKEGATE_MAX_URI_BYTES", pipeline::DEFAULT_MAX_URI, 256..=1 << 20)?,
            max_head: count(src, "WAKEGATE_MAX_HEADER_BYTES", pipeline::DEFAULT_MAX_HEAD, 1024..=1 << 20)?,
            header_read_timeout: secs(
                src,
                "WAKEGATE_HEADER_READ_SECS",
                secs_default(native::DEFAULT_HEADER_READ_TIMEOUT),
            )?,
            idle_timeout: secs(src, "WAKEGATE_IDLE_SECS", secs_default(native::DEFAULT_IDLE_TIMEOUT))?,
            max_connections: count(src, "WAKEGATE_MAX_CONNECTIONS", native::DEFAULT_MAX_CONNECTIONS, 1..=10_000_000)?,
            max_per_ip: count(src, "WAKEGATE_MAX_CONNECTIONS_PER_IP", native::DEFAULT_MAX_PER_IP, 1..=10_000_000)?,
            busy_poll: Duration::from_micros(count(
                src,
                "WAKEGATE_EDGE_BUSY_POLL_US",
                native::DEFAULT_BUSY_POLL.as_micros() as usize,
                0..=10_000,
            )? as u64),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Local,
    Hetzner,
}

/// `WAKEGATE_HETZNER_*` and the agent endpoint's settings.
#[derive(Clone, Debug)]
pub struct HetznerConfig {
    pub token: Option<String>,
    pub api_url: String,
    pub image: String,
    pub server_type: String,
    pub location: String,
    /// Where the agent endpoint listens.
    pub agent_addr: SocketAddr,
    /// What agents on the machines call; default `http://<agent addr>`.
    pub control_url: Option<String>,
    /// Signs the machines' agent tokens; the same on every provisioner replica.
    pub machine_key: Option<Key>,
    pub control_plane_ips: Vec<String>,
    pub edge_ranges: Vec<String>,
    pub app_port: u16,
    pub pools: Vec<wakegate_provisioner::hetzner::PoolSpec>,
    pub action_poll: Duration,
    pub backoff: Duration,
    pub ready_timeout: Duration,
    pub agent_retry: Duration,
}

fn list(src: &dyn Source, key: &str) -> Option<Vec<String>> {
    src.get(key).map(|v| v.split([',', ' ']).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
}

/// `WAKEGATE_POOLS`: comma-separated `[<project>/]<server type>@<location>:<min ready>:<max>:<max
/// age secs>`. A pool with a project holds machines for that project's previews, made
/// from its database image once one is baked.
pub fn parse_pools(v: &str) -> Result<Vec<wakegate_provisioner::hetzner::PoolSpec>, ConfigError> {
    let bad = |reason: String| ConfigError::Invalid { key: "WAKEGATE_POOLS", reason };
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parts: Vec<&str> = item.split(':').collect();
        let [kind, min, max, age] = parts.as_slice() else {
            return Err(bad(format!("{item:?}: expected <type>@<location>:<min>:<max>:<max age secs>")));
        };
        let (project, kind) = match kind.split_once('/') {
            Some((p, k))
                if (1..=63).contains(&p.len())
                    && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
            {
                (Some(p.to_string()), k)
            }
            Some((p, _)) => return Err(bad(format!("{item:?}: {p:?} is not a project name"))),
            None => (None, *kind),
        };
        let (server_type, location) =
            kind.split_once('@').ok_or_else(|| bad(format!("{item:?}: expected <type>@<location>")))?;
        let num = |s: &str| s.parse::<u64>().map_err(|e| bad(format!("{item:?}: {s:?}: {e}")));
        let (min_ready, max, max_age_secs) = (num(min)? as usize, num(max)? as usize, num(age)?);
        if max < min_ready || max_age_secs == 0 {
            return Err(bad(format!("{item:?}: max must be ≥ min and the age positive")));
        }
        out.push(wakegate_provisioner::hetzner::PoolSpec {
            server_type: server_type.into(),
            location: location.into(),
            image: None,
            project,
            min_ready,
            max,
            max_age_secs,
        });
    }
    Ok(out)
}

fn parse<T: std::str::FromStr>(src: &dyn Source, key: &'static str, default: T) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match src.get(key) {
        Some(v) => v.parse().map_err(|e: T::Err| ConfigError::Invalid { key, reason: format!("{v:?}: {e}") }),
        None => Ok(default),
    }
}

/// Longest duration any setting takes: ten years.
const MAX_SECS: f64 = 10.0 * 365.0 * 86_400.0;

fn secs(src: &dyn Source, key: &'static str, default: f64) -> Result<Duration, ConfigError> {
    let v: f64 = parse(src, key, default)?;
    if !(v.is_finite() && v > 0.0 && v <= MAX_SECS) {
        return Err(ConfigError::Invalid { key, reason: format!("must be a number of seconds in (0, {MAX_SECS}]") });
    }
    Ok(Duration::from_secs_f64(v))
}

fn count(
    src: &dyn Source,
    key: &'static str,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize, ConfigError> {
    let v: usize = parse(src, key, default)?;
    if !range.contains(&v) {
        return Err(ConfigError::Invalid {
            key,
            reason: format!("{v} is outside {}..={}", range.start(), range.end()),
        });
    }
    Ok(v)
}

/// A secret from `KEY` or from the file named by `KEY_FILE`.
fn secret(src: &dyn Source, key: &'static str, file_key: &'static str) -> Result<Option<String>, ConfigError> {
    if let Some(v) = src.get(key) {
        return Ok(Some(v));
    }
    match src.get(file_key) {
        Some(path) => std::fs::read_to_string(&path)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|e| ConfigError::Invalid { key: file_key, reason: format!("{path}: {e}") }),
        None => Ok(None),
    }
}

fn key(src: &dyn Source, name: &'static str, file: &'static str) -> Result<Option<Key>, ConfigError> {
    match secret(src, name, file)? {
        Some(s) if s.len() < 16 => {
            Err(ConfigError::Invalid { key: name, reason: "must be at least 16 characters".into() })
        }
        Some(s) => Ok(Some(Key::new(s.into_bytes()))),
        None => Ok(None),
    }
}

impl Config {
    pub fn from_source(src: &dyn Source) -> Result<Config, ConfigError> {
        let waker_addr: SocketAddr =
            parse(src, "WAKEGATE_WAKER_ADDR", DEFAULT_WAKER_ADDR.parse().expect("valid default"))?;
        let base = src.get("WAKEGATE_PREVIEW_BASE").unwrap_or_else(|| DEFAULT_PREVIEW_BASE.into());
        let base = wakegate_core::host::normalize_host(&base)
            .map_err(|e| ConfigError::Invalid { key: "WAKEGATE_PREVIEW_BASE", reason: e.to_string() })?
            .to_string();
        // the provisioner's own defaults are the defaults of its settings
        let prov = wakegate_provisioner::Settings::default();
        Ok(Config {
            data_dir: src.get("WAKEGATE_DATA").map(PathBuf::from).unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            edge_addr: parse(src, "WAKEGATE_EDGE_ADDR", DEFAULT_EDGE_ADDR.parse().expect("valid default"))?,
            waker_addr,
            waker_url: src.get("WAKEGATE_WAKER_URL").unwrap_or_else(|| format!("http://{waker_addr}")),
            redis_url: src.get("WAKEGATE_REDIS_URL"),
            redis_prefix: src.get("WAKEGATE_REDIS_PREFIX").unwrap_or_else(|| "wg:".into()),
            preview_base: base,
            preview_url_template: src.get("WAKEGATE_PREVIEW_URL"),
            edge_key: key(src, "WAKEGATE_EDGE_KEY", "WAKEGATE_EDGE_KEY_FILE")?,
            csrf_key: key(src, "WAKEGATE_CSRF_KEY", "WAKEGATE_CSRF_KEY_FILE")?,
            origin_key: key(src, "WAKEGATE_ORIGIN_KEY", "WAKEGATE_ORIGIN_KEY_FILE")?,
            operator_token: secret(src, "WAKEGATE_OPERATOR_TOKEN", "WAKEGATE_OPERATOR_TOKEN_FILE")?,
            metrics_addr: src
                .get("WAKEGATE_METRICS_ADDR")
                .map(|v| {
                    v.parse().map_err(|e| ConfigError::Invalid {
                        key: "WAKEGATE_METRICS_ADDR",
                        reason: format!("{v:?}: {e} (an address and port, e.g. 127.0.0.1:9464)"),
                    })
                })
                .transpose()?,
            sweep_every: secs(src, "WAKEGATE_SWEEP_SECS", prov.sweep_every.as_secs_f64())?,
            shutdown_grace: secs(src, "WAKEGATE_SHUTDOWN_GRACE_SECS", 20.0)?,
            lease: secs(src, "WAKEGATE_LEASE_SECS", prov.lease.as_secs_f64())?,
            orphan_grace: secs(src, "WAKEGATE_ORPHAN_GRACE_SECS", prov.orphan_grace.as_secs_f64())?,
            cloud_requests_per_hour: count(
                src,
                "WAKEGATE_CLOUD_REQUESTS_PER_HOUR",
                prov.cloud_requests_per_hour as usize,
                1..=100_000,
            )?,
            cloud_list_every: secs(src, "WAKEGATE_CLOUD_LIST_SECS", prov.list_every.as_secs_f64())?,
            liveness_every: secs(src, "WAKEGATE_LIVENESS_SECS", prov.liveness_every.as_secs_f64())?,
            max_builds: count(src, "WAKEGATE_MAX_BUILDS", prov.max_builds, 1..=256)?,
            max_quick_jobs: count(src, "WAKEGATE_MAX_QUICK_JOBS", prov.max_quick_jobs, 1..=1024)?,
            db_images: parse(src, "WAKEGATE_DB_IMAGES", prov.db_images)?,
            dns_servers: match src.get("WAKEGATE_DNS_SERVERS") {
                Some(v) => {
                    v.split(',').map(|a| a.trim().parse::<SocketAddr>()).collect::<Result<Vec<_>, _>>().map_err(
                        |e| ConfigError::Invalid {
                            key: "WAKEGATE_DNS_SERVERS",
                            reason: format!("{v:?}: {e} (comma-separated ip:port)"),
                        },
                    )?
                }
                None => Vec::new(),
            },
            domain_grace: secs(src, "WAKEGATE_DOMAIN_GRACE_SECS", 86_400.0)?,
            domain_recheck_every: secs(src, "WAKEGATE_DOMAIN_RECHECK_SECS", 3_600.0)?,
            custom_host_target: src.get("WAKEGATE_CUSTOM_HOST_TARGET"),
            forge: wakegate_waker::forge::ForgeSettings {
                inbox_every: secs(src, "WAKEGATE_FORGE_INBOX_SECS", 1.0)?,
                status_every: secs(src, "WAKEGATE_FORGE_STATUS_SECS", 5.0)?,
                reconcile_every: secs(src, "WAKEGATE_FORGE_RECONCILE_SECS", 300.0)?,
                remember: secs(src, "WAKEGATE_FORGE_REMEMBER_SECS", 3.0 * 86_400.0)?,
            },
            saas: match (
                src.get("WAKEGATE_CLOUDFLARE_ZONE_ID"),
                secret(src, "WAKEGATE_CLOUDFLARE_API_TOKEN", "WAKEGATE_CLOUDFLARE_API_TOKEN_FILE")?,
            ) {
                (Some(zone_id), Some(token)) => Some(wakegate_waker::saas::SaasConfig {
                    api: src
                        .get("WAKEGATE_CLOUDFLARE_API")
                        .unwrap_or_else(|| "https://api.cloudflare.com/client/v4".into()),
                    zone_id,
                    token,
                    wildcard: parse(src, "WAKEGATE_CLOUDFLARE_WILDCARD", false)?,
                    every: secs(src, "WAKEGATE_SAAS_SECS", 30.0)?,
                }),
                (None, None) => None,
                (Some(_), None) => return Err(ConfigError::Missing("WAKEGATE_CLOUDFLARE_API_TOKEN")),
                (None, Some(_)) => return Err(ConfigError::Missing("WAKEGATE_CLOUDFLARE_ZONE_ID")),
            },
            route_ttl: secs(src, "WAKEGATE_ROUTE_CACHE_SECS", 2.0)?,
            hold_timeout: secs(src, "WAKEGATE_HOLD_SECS", 30.0)?,
            activity_every: secs(src, "WAKEGATE_ACTIVITY_SECS", 1.0)?,
            edge: EdgeSettings::from_source(src)?,
            backend: match src.get("WAKEGATE_BACKEND").as_deref() {
                None | Some("local") => BackendKind::Local,
                Some("hetzner") => BackendKind::Hetzner,
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        key: "WAKEGATE_BACKEND",
                        reason: format!("{other:?}: expected local or hetzner"),
                    })
                }
            },
            s3: match src.get("WAKEGATE_S3_BUCKET") {
                None => None,
                Some(bucket) => Some(wakegate_db::s3::S3Config {
                    endpoint: src.get("WAKEGATE_S3_ENDPOINT"),
                    region: src.get("WAKEGATE_S3_REGION").unwrap_or_else(|| "us-east-1".into()),
                    bucket,
                    path_style: parse(src, "WAKEGATE_S3_PATH_STYLE", false)?,
                    access_key_id: secret(src, "WAKEGATE_S3_ACCESS_KEY_ID", "WAKEGATE_S3_ACCESS_KEY_ID_FILE")?
                        .ok_or(ConfigError::Missing("WAKEGATE_S3_ACCESS_KEY_ID"))?,
                    secret_access_key: secret(
                        src,
                        "WAKEGATE_S3_SECRET_ACCESS_KEY",
                        "WAKEGATE_S3_SECRET_ACCESS_KEY_FILE",
                    )?
                    .ok_or(ConfigError::Missing("WAKEGATE_S3_SECRET_ACCESS_KEY"))?,
                    prefix: src.get("WAKEGATE_S3_PREFIX").unwrap_or_else(|| "wakegate/".into()),
                }),
            },
            hetzner: HetznerConfig {
                token: secret(src, "WAKEGATE_HETZNER_TOKEN", "WAKEGATE_HETZNER_TOKEN_FILE")?,
                api_url: src
                    .get("WAKEGATE_HETZNER_URL")
                    .unwrap_or_else(|| wakegate_provisioner::hetzner::api::BASE_URL.into()),
                image: src.get("WAKEGATE_HETZNER_IMAGE").unwrap_or_else(|| "ubuntu-24.04".into()),
                server_type: src.get("WAKEGATE_HETZNER_SERVER_TYPE").unwrap_or_else(|| "cx22".into()),
                location: src.get("WAKEGATE_HETZNER_LOCATION").unwrap_or_else(|| "fsn1".into()),
                agent_addr: parse(src, "WAKEGATE_AGENT_ADDR", "127.0.0.1:7002".parse().expect("valid default"))?,
                control_url: src.get("WAKEGATE_CONTROL_URL"),
                machine_key: key(src, "WAKEGATE_MACHINE_KEY", "WAKEGATE_MACHINE_KEY_FILE")?,
                control_plane_ips: list(src, "WAKEGATE_CONTROL_PLANE_IPS").unwrap_or_default(),
                edge_ranges: list(src, "WAKEGATE_EDGE_RANGES").unwrap_or_else(|| {
                    wakegate_provisioner::hetzner::CLOUDFLARE_RANGES.iter().map(|s| s.to_string()).collect()
                }),
                app_port: parse(src, "WAKEGATE_APP_PORT", 80)?,
                pools: match src.get("WAKEGATE_POOLS") {
                    Some(v) => parse_pools(&v)?,
                    None => Vec::new(),
                },
                action_poll: secs(src, "WAKEGATE_HETZNER_POLL_SECS", 1.0)?,
                backoff: secs(src, "WAKEGATE_HETZNER_BACKOFF_SECS", 0.5)?,
                ready_timeout: secs(src, "WAKEGATE_READY_TIMEOUT_SECS", 900.0)?,
                agent_retry: secs(src, "WAKEGATE_AGENT_RETRY_SECS", 1.0)?,
            },
        })
    }

    pub fn require_key(k: &Option<Key>, name: &'static str) -> Result<Key, ConfigError> {
        k.clone().ok_or(ConfigError::Missing(name))
    }

    /// The provisioner's tunables from these settings.
    pub fn provisioner_settings(&self, preview_url_template: String) -> wakegate_provisioner::Settings {
        wakegate_provisioner::Settings {
            lease: self.lease,
            poll: Duration::from_millis(500),
            sweep_every: self.sweep_every,
            orphan_grace: self.orphan_grace,
            preview_url_template,
            cloud_requests_per_hour: self.cloud_requests_per_hour as u32,
            list_every: self.cloud_list_every,
            liveness_every: self.liveness_every,
            max_builds: self.max_builds,
            max_quick_jobs: self.max_quick_jobs,
            db_images: self.db_images,
            shutdown_grace: self.shutdown_grace,
        }
    }

    /// The native edge's configuration, with these keys.
    pub fn edge_config(
        &self,
        waker_url: String,
        edge_key: Key,
        csrf_key: Key,
        origin_key: Key,
    ) -> wakegate_edge::native::EdgeConfig {
        let e = &self.edge;
        let mut c = wakegate_edge::native::EdgeConfig::new(waker_url, edge_key, csrf_key, origin_key);
        c.route_ttl = self.route_ttl;
        c.hold_timeout = self.hold_timeout;
        c.activity_every = self.activity_every;
        c.negative_ttl = e.negative_ttl;
        c.cache_capacity = e.cache_capacity;
        c.scheme = e.scheme;
        c.trusted_proxies = e.trusted_proxies.clone();
        c.limits = wakegate_edge::pipeline::Limits { max_uri: e.max_uri, max_head: e.max_head };
        c.header_read_timeout = e.header_read_timeout;
        c.idle_timeout = e.idle_timeout;
        c.max_connections = e.max_connections;
        c.max_per_ip = e.max_per_ip;
        c.busy_poll = e.busy_poll;
        c
    }

    /// The org settings of the waker.
    pub fn org_settings(&self) -> wakegate_waker::orgs::OrgSettings {
        use wakegate_waker::dns::HickoryTxt;
        let dns = if self.dns_servers.is_empty() {
            HickoryTxt::system()
        } else {
            HickoryTxt::with_servers(&self.dns_servers)
        };
        wakegate_waker::orgs::OrgSettings {
            dns: std::sync::Arc::new(dns),
            custom_host_target: self.custom_host_target.clone().unwrap_or_else(|| self.preview_base.clone()),
            grace: self.domain_grace,
            recheck_every: self.domain_recheck_every,
        }
    }

    pub fn preview_url(&self, edge_port: u16) -> String {
        self.preview_url_template
            .clone()
            .unwrap_or_else(|| format!("http://{{label}}.{}:{edge_port}", self.preview_base))
    }
}

/// 32 random bytes as hex: for dev-mode keys and tokens.
pub fn random_secret() -> String {
    wakegate_store::new_id("") + &wakegate_store::new_id("") + &wakegate_store::new_id("") + &wakegate_store::new_id("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        let c = Config::from_source(&src(&[])).unwrap();
        assert_eq!(c.edge_addr.to_string(), DEFAULT_EDGE_ADDR);
        assert_eq!(c.waker_url, "http://127.0.0.1:7001");
        assert_eq!(c.preview_url(8080), "http://{label}.localhost:8080");
        let e = Config::from_source(&src(&[("WAKEGATE_LEASE_SECS", "-1")])).unwrap_err();
        assert!(e.to_string().starts_with("WAKEGATE_LEASE_SECS"), "{e}");
        let e = Config::from_source(&src(&[("WAKEGATE_EDGE_KEY", "short")])).unwrap_err();
        assert!(e.to_string().contains("WAKEGATE_EDGE_KEY"));
        let e = Config::from_source(&src(&[("WAKEGATE_PREVIEW_BASE", "bad_base!")])).unwrap_err();
        assert!(e.to_string().contains("WAKEGATE_PREVIEW_BASE"));
        let e = Config::from_source(&src(&[("WAKEGATE_EDGE_ADDR", "nope")])).unwrap_err();
        assert!(e.to_string().contains("WAKEGATE_EDGE_ADDR"));
        let e = Config::from_source(&src(&[("WAKEGATE_BACKEND", "aws")])).unwrap_err();
        assert!(e.to_string().contains("WAKEGATE_BACKEND"));
        // busy-polling: on by default, off with 0, an absurd window refused by name
        assert_eq!(c.edge.busy_poll, Duration::from_micros(100));
        let off = Config::from_source(&src(&[("WAKEGATE_EDGE_BUSY_POLL_US", "0")])).unwrap();
        let key = || Key::new(vec![7; 32]);
        assert!(off.edge_config("http://w".into(), key(), key(), key()).busy_poll.is_zero());
        for bad in ["-1", "10001", "1e9", "soon"] {
            let e = Config::from_source(&src(&[("WAKEGATE_EDGE_BUSY_POLL_US", bad)])).unwrap_err();
            assert!(e.to_string().starts_with("WAKEGATE_EDGE_BUSY_POLL_US"), "{bad}: {e}");
        }
    }

    #[test]
    fn pools_parse_and_refuse() {
        let p = parse_pools("cx22@fsn1:2:5:86400, cpx31@nbg1:0:1:3600").unwrap();
        assert!(p.iter().all(|p| p.project.is_none()));
        let p = parse_pools("shop/cx22@fsn1:1:3:86400").unwrap();
        assert_eq!((p[0].project.as_deref(), p[0].server_type.as_str()), (Some("shop"), "cx22"));
        assert!(parse_pools("Shop!/cx22@fsn1:1:3:86400").unwrap_err().to_string().contains("not a project name"));
        let p = parse_pools("cx22@fsn1:2:5:86400, cpx31@nbg1:0:1:3600").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].server_type.as_str(), p[0].location.as_str(), p[0].min_ready, p[0].max),
            ("cx22", "fsn1", 2, 5)
        );
        assert_eq!(p[1].max_age_secs, 3600);
        for bad in ["cx22:1:2:3", "cx22@fsn1:3:2:60", "cx22@fsn1:1:2", "cx22@fsn1:a:2:60", "cx22@fsn1:1:2:0"] {
            let e = parse_pools(bad).unwrap_err().to_string();
            assert!(e.contains("WAKEGATE_POOLS"), "{bad}: {e}");
        }
        let c = Config::from_source(&src(&[])).unwrap();
        assert_eq!(c.backend, BackendKind::Local);
        assert!(c.hetzner.edge_ranges.iter().any(|r| r == "173.245.48.0/20"));
    }
}
