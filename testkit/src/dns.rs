//! A DNS server on 127.0.0.1 (hickory-server, UDP and TCP on one port) serving zones a
//! test writes and changes while it runs: the stand-in for an org's DNS provider.

use hickory_server::proto::rr::rdata::{SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};

type Zone = Arc<InMemoryZoneHandler>;

pub struct DnsServer {
    pub addr: SocketAddr,
    zones: HashMap<String, Zone>,
    _server: Server<Catalog>,
}

fn name(s: &str) -> Name {
    Name::from_str(&format!("{}.", s.trim_end_matches('.'))).expect("a valid DNS name")
}

impl DnsServer {
    /// Serves empty zones (an SOA each, negative answers uncached) for `origins`.
    pub async fn start(origins: &[&str]) -> DnsServer {
        let mut catalog = Catalog::new();
        let mut zones = HashMap::new();
        for origin in origins {
            let o = name(origin);
            let mut z = InMemoryZoneHandler::empty(o.clone(), ZoneType::Primary, AxfrPolicy::Deny);
            let soa =
                SOA::new(name(&format!("ns1.{origin}")), name(&format!("hostmaster.{origin}")), 1, 3600, 600, 86400, 0);
            assert!(z.upsert_mut(Record::from_rdata(o.clone(), 0, RData::SOA(soa)), 1));
            let z: Zone = Arc::new(z);
            catalog.upsert(LowerName::new(&o), vec![z.clone() as Arc<dyn ZoneHandler>]);
            zones.insert(origin.trim_end_matches('.').to_string(), z);
        }
        // UDP and TCP on the same free port
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
            let port = udp.local_addr().expect("udp addr").port();
            if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().expect("udp addr");
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 65535);
        DnsServer { addr, zones, _server: server }
    }

    fn zone_of(&self, host: &str) -> &Zone {
        let host = host.trim_end_matches('.');
        self.zones
            .iter()
            .filter(|(o, _)| host == o.as_str() || host.ends_with(&format!(".{o}")))
            .max_by_key(|(o, _)| o.len())
            .map(|(_, z)| z)
            .unwrap_or_else(|| panic!("no zone serves {host}"))
    }

    /// Replaces the TXT records at `host` (none: removes them).
    pub async fn set_txt(&self, host: &str, values: &[&str]) {
        let zone = self.zone_of(host);
        let n = name(host);
        zone.records_mut().await.remove(&RrKey::new(LowerName::new(&n), RecordType::TXT));
        let serial = zone.serial().await + 1;
        for v in values {
            let txt = TXT::new(vec![v.to_string()]);
            assert!(zone.upsert(Record::from_rdata(n.clone(), 0, RData::TXT(txt)), serial).await);
        }
    }
}
