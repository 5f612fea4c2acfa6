//! TXT lookups for domain verification, with hickory's resolver.
//!
//! Production asks the system's resolvers (`/etc/resolv.conf`), or the servers named in
//! `WAKEGATE_DNS_SERVERS`; tests point it at a DNS server on 127.0.0.1. Nothing is
//! cached: a check must see a record the moment it is created or removed.

use async_trait::async_trait;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use std::net::SocketAddr;
use std::time::Duration;

/// What a TXT lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The TXT records (each record's strings joined, as RFC 7208 reads them).
    Records(Vec<String>),
    /// The name exists but has no TXT record (NOERROR, no data).
    NoRecords,
    /// The name does not exist (NXDOMAIN).
    NoSuchName,
    /// The lookup failed (timeout, no server, SERVFAIL, REFUSED): nothing is known.
    Failed(String),
}

#[async_trait]
pub trait TxtResolver: Send + Sync + 'static {
    async fn txt(&self, name: &str) -> Lookup;
}

/// hickory's resolver, uncached, made on first use (a waker whose settings replace the
/// default one never reads `/etc/resolv.conf` for nothing).
pub struct HickoryTxt {
    /// `None`: the system's resolvers.
    servers: Option<Vec<SocketAddr>>,
    resolver: std::sync::OnceLock<Result<TokioResolver, String>>,
}

/// Longest one attempt at one server may take.
const TIMEOUT: Duration = Duration::from_secs(5);

impl HickoryTxt {
    /// The system's resolvers (a broken `/etc/resolv.conf` makes every lookup fail with
    /// the reason, rather than the waker refusing to start).
    pub fn system() -> HickoryTxt {
        HickoryTxt { servers: None, resolver: std::sync::OnceLock::new() }
    }

    /// Only these servers, over UDP and TCP.
    pub fn with_servers(servers: &[SocketAddr]) -> HickoryTxt {
        HickoryTxt { servers: Some(servers.to_vec()), resolver: std::sync::OnceLock::new() }
    }

    fn resolver(&self) -> &Result<TokioResolver, String> {
        self.resolver.get_or_init(|| match &self.servers {
            None => Resolver::builder_tokio().map_err(|e| format!("system resolver: {e}")).and_then(|mut b| {
                uncached(b.options_mut());
                b.build().map_err(|e| format!("system resolver: {e}"))
            }),
            Some(servers) => {
                let name_servers = servers
                    .iter()
                    .map(|a| {
                        let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                        for c in &mut ns.connections {
                            c.port = a.port();
                        }
                        ns
                    })
                    .collect();
                let config = ResolverConfig::from_name_servers(name_servers);
                let mut b = Resolver::builder_with_config(config, TokioRuntimeProvider::default());
                uncached(b.options_mut());
                b.options_mut().use_hosts_file = ResolveHosts::Never;
                b.build().map_err(|e| format!("resolver: {e}"))
            }
        })
    }
}

fn uncached(o: &mut hickory_resolver::config::ResolverOpts) {
    o.cache_size = 0;
    o.positive_max_ttl = Some(Duration::ZERO);
    o.negative_max_ttl = Some(Duration::ZERO);
    o.timeout = TIMEOUT;
    o.attempts = 1;
}

#[async_trait]
impl TxtResolver for HickoryTxt {
    async fn txt(&self, name: &str) -> Lookup {
        let resolver = match self.resolver() {
            Ok(r) => r,
            Err(e) => return Lookup::Failed(e.clone()),
        };
        // fully qualified: no search domains
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match resolver.txt_lookup(fqdn).await {
            Ok(found) => {
                let records: Vec<String> = found
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TXT(txt) => Some(txt.txt_data.iter().map(|s| String::from_utf8_lossy(s)).collect()),
                        _ => None,
                    })
                    .collect();
                if records.is_empty() {
                    Lookup::NoRecords
                } else {
                    Lookup::Records(records)
                }
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(nr))) if nr.response_code == ResponseCode::NXDomain => {
                Lookup::NoSuchName
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(_))) => Lookup::NoRecords,
            Err(NetError::Dns(DnsError::ResponseCode(rc))) => Lookup::Failed(format!("the server answered {rc}")),
            Err(NetError::Timeout) => Lookup::Failed("no answer in time".into()),
            Err(e) => Lookup::Failed(e.to_string()),
        }
    }
}
