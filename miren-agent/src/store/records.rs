//! What the store holds: the key layout ([`RecordKey`]) and the records stored at each key,
//! encoded as JSON.
//!
//! | key                                  | record                 | written by            |
//! |--------------------------------------|------------------------|-----------------------|
//! | `apps/APP`                           | [`AppRecord`]          | deploys               |
//! | `nodeports/PROTO/PORT`               | [`NodePortRecord`]     | deploys (the claim)   |
//! | `routes/HOST`                        | [`RouteRecord`]        | `miren route`         |
//! | `endpoints/APP/SERVICE/NODE`         | [`EndpointMap`]        | the node (leased)     |
//! | `nodes/NODE`                         | [`NodeRecord`]         | the node, `miren node`|
//! | `alive/NODE`                         | [`Heartbeat`]          | the node (leased)     |
//! | `subnets/A.B.C.D_N`                  | [`SubnetClaim`]        | the node (the claim)  |
//! | `demand/APP/SERVICE/NODE`            | [`Demand`]             | the node (leased)     |
//! | `placements/APP/SERVICE`             | [`Placement`]          | the scheduler         |
//! | `leader/ROLE`                        | [`Leader`]             | the elected (leased)  |
//! | `certs/HOST`                         | [`CertRecord`]         | `miren cert`, ACME    |
//! | `challenges/TOKEN`                   | [`Challenge`]          | the ACME node (leased)|
//! | `acme/account`                       | [`AcmeAccount`]        | the ACME node         |
//!
//! A node port is claimed by creating its key in the transaction that writes its app, so two
//! apps can never hold the same `(node_port, protocol)`.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{KeyValue, StoreError};
use crate::config::Protocol;

/// A deployed app as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    /// App name (primary key).
    pub name: String,
    /// File name shown in diagnostics, as the deploying client named it.
    pub source_name: String,
    /// The app.toml text as deployed.
    pub toml: String,
    /// Deploy counter, starting at 1.
    pub version: u64,
    /// Unix time of the deploy.
    pub deployed_at: u64,
    /// The SHA-256 (hex) of the app's code bundle, if the client uploaded one: instances run
    /// from the agent's unpacked copy of it.
    #[serde(default)]
    pub bundle: Option<String>,
    /// The app directory an agent before bundles ran instances from (records written by an
    /// older agent only; a redeploy replaces it with a bundle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// Target ports the agent assigned to ports that app.toml left without `port`, keyed by
    /// (service, port name).
    #[serde(default, with = "assigned_ports")]
    pub assigned_ports: BTreeMap<(String, String), u16>,
}

/// A published node port (the value of its claim key): `(node_port, protocol)` is unique
/// across all apps.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodePortRecord {
    /// Port on the node's addresses.
    pub node_port: u16,
    /// Transport protocol.
    #[serde(with = "protocol")]
    pub protocol: Protocol,
    /// Owning app.
    pub app: String,
    /// Owning service.
    pub service: String,
    /// The service port it forwards to.
    pub port_name: String,
}

/// A route: normalized host → app service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteRecord {
    /// Normalized host.
    pub host: String,
    /// Target app.
    pub app: String,
    /// Target service.
    pub service: String,
    /// Upstream timeout in milliseconds; `None` means the ingress default.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Endpoints of one service on one node, per port name.
pub type EndpointMap = BTreeMap<String, Vec<SocketAddr>>;

/// A node of the cluster, kept after its agent is gone (then its status is lost).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name.
    pub name: String,
    /// The node's own addresses (`--node-ip`).
    pub addresses: Vec<IpAddr>,
    /// Where the other agents reach its cluster listener (cluster mode).
    #[serde(default)]
    pub cluster_addr: Option<SocketAddr>,
    /// The node's sandbox subnet.
    pub subnet: String,
    /// Whether new instances are kept off the node.
    #[serde(default)]
    pub cordoned: bool,
    /// Whether the node's instances are being moved off it (it is cordoned too).
    #[serde(default)]
    pub draining: bool,
    /// Whether the node's agent runs instances (not with `--no-sandboxes`).
    #[serde(default)]
    pub runs_instances: bool,
    /// Unix time the node first registered.
    pub registered_at: u64,
}

/// The requests one node's ingress has for an auto service, under the node's lease: present
/// while the node saw a request for the service within its `scale_down_delay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    /// Requests in flight (waiting for an instance included) when last sampled.
    pub in_flight: u32,
}

/// Where a service's instances run: one node name per instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// A node per instance (a node may appear several times), sorted.
    pub nodes: Vec<String>,
}

/// A TLS certificate every node's ingress serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    /// The host (or `*.domain`) it is stored for.
    pub host: String,
    /// PEM certificate chain.
    pub cert_pem: String,
    /// PEM private key.
    pub key_pem: String,
    /// `user` (set with `miren cert set`) or `acme` (obtained by the agent).
    pub source: String,
}

/// A pending ACME HTTP-01 challenge, answered by whichever node's ingress receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The body to answer with.
    pub key_authorization: String,
}

/// The cluster's ACME account: whichever node holds the `acme` role orders with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeAccount {
    /// The ACME directory URL the account belongs to.
    pub directory: String,
    /// The account's credentials as the ACME client stores them (private key included).
    pub credentials: serde_json::Value,
}

/// The holder of an elected role (e.g. the scheduler), under its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    /// The node holding the role.
    pub node: String,
}

/// A node's sign of life, under its lease: gone when the node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Unix time of the heartbeat.
    pub at: u64,
}

/// A sandbox subnet claimed by a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetClaim {
    /// The node holding it.
    pub node: String,
}

/// A key of the store, parsed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKey {
    /// `apps/APP`.
    App(String),
    /// `nodeports/PROTO/PORT`.
    NodePort(Protocol, u16),
    /// `routes/HOST`.
    Route(String),
    /// `endpoints/APP/SERVICE/NODE`.
    Endpoints {
        /// App.
        app: String,
        /// Service.
        service: String,
        /// Node that runs the endpoints.
        node: String,
    },
    /// `nodes/NODE`.
    Node(String),
    /// `alive/NODE`.
    Alive(String),
    /// `subnets/A.B.C.D_N` (the subnet `A.B.C.D/N`).
    Subnet(String),
    /// `demand/APP/SERVICE/NODE`.
    Demand {
        /// App.
        app: String,
        /// Service.
        service: String,
        /// The node whose ingress has the requests.
        node: String,
    },
    /// `placements/APP/SERVICE`.
    Placement {
        /// App.
        app: String,
        /// Service.
        service: String,
    },
    /// `leader/ROLE`.
    Leader(String),
    /// `certs/HOST`.
    Cert(String),
    /// `challenges/TOKEN`.
    Challenge(String),
    /// `acme/account`.
    AcmeAccount,
}

impl RecordKey {
    /// Parses a key; `None` for keys this agent does not know (written by a newer agent).
    pub fn parse(key: &str) -> Option<Self> {
        let parts: Vec<&str> = key.split('/').collect();
        match parts.as_slice() {
            ["apps", app] => Some(Self::App((*app).to_owned())),
            ["nodeports", proto, port] => Some(Self::NodePort(
                Protocol::from_name(proto)?,
                port.parse().ok()?,
            )),
            ["routes", host] => Some(Self::Route((*host).to_owned())),
            ["endpoints", app, service, node] => Some(Self::Endpoints {
                app: (*app).to_owned(),
                service: (*service).to_owned(),
                node: (*node).to_owned(),
            }),
            ["nodes", node] => Some(Self::Node((*node).to_owned())),
            ["alive", node] => Some(Self::Alive((*node).to_owned())),
            ["subnets", subnet] => Some(Self::Subnet(subnet.replacen('_', "/", 1))),
            ["demand", app, service, node] => Some(Self::Demand {
                app: (*app).to_owned(),
                service: (*service).to_owned(),
                node: (*node).to_owned(),
            }),
            ["placements", app, service] => Some(Self::Placement {
                app: (*app).to_owned(),
                service: (*service).to_owned(),
            }),
            ["leader", role] => Some(Self::Leader((*role).to_owned())),
            ["certs", host] => Some(Self::Cert((*host).to_owned())),
            ["challenges", token] => Some(Self::Challenge((*token).to_owned())),
            ["acme", "account"] => Some(Self::AcmeAccount),
            _ => None,
        }
    }

    /// The key of a node port's claim.
    pub fn node_port(record: &NodePortRecord) -> Self {
        Self::NodePort(record.protocol, record.node_port)
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::App(app) => write!(f, "apps/{app}"),
            Self::NodePort(proto, port) => write!(f, "nodeports/{proto}/{port}"),
            Self::Route(host) => write!(f, "routes/{host}"),
            Self::Endpoints { app, service, node } => {
                write!(f, "endpoints/{app}/{service}/{node}")
            }
            Self::Node(node) => write!(f, "nodes/{node}"),
            Self::Alive(node) => write!(f, "alive/{node}"),
            Self::Subnet(subnet) => write!(f, "subnets/{}", subnet.replacen('/', "_", 1)),
            Self::Demand { app, service, node } => write!(f, "demand/{app}/{service}/{node}"),
            Self::Placement { app, service } => write!(f, "placements/{app}/{service}"),
            Self::Leader(role) => write!(f, "leader/{role}"),
            Self::Cert(host) => write!(f, "certs/{host}"),
            Self::Challenge(token) => write!(f, "challenges/{token}"),
            Self::AcmeAccount => f.write_str("acme/account"),
        }
    }
}

impl From<RecordKey> for String {
    fn from(key: RecordKey) -> Self {
        key.to_string()
    }
}

/// The prefix of every endpoints key of `app`.
pub fn app_endpoints_prefix(app: &str) -> String {
    format!("endpoints/{app}/")
}

/// The prefix of every placement key of `app`.
pub fn app_placements_prefix(app: &str) -> String {
    format!("placements/{app}/")
}

/// The role of the agent that places instances on nodes.
pub const SCHEDULER: &str = "scheduler";
/// The role of the agent that orders certificates over ACME.
pub const ACME: &str = "acme";

/// A decoded key-value pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// An app.
    App(AppRecord),
    /// A node-port claim.
    NodePort(NodePortRecord),
    /// A route.
    Route(RouteRecord),
    /// One node's endpoints of one service.
    Endpoints(EndpointMap),
    /// A node.
    Node(NodeRecord),
    /// A node's heartbeat.
    Alive(Heartbeat),
    /// A subnet's holder.
    Subnet(SubnetClaim),
    /// One node's requests for an auto service.
    Demand(Demand),
    /// Where a service's instances run.
    Placement(Placement),
    /// The holder of a role.
    Leader(Leader),
    /// A certificate.
    Cert(CertRecord),
    /// A pending ACME challenge.
    Challenge(Challenge),
    /// The ACME account.
    AcmeAccount(AcmeAccount),
}

impl Record {
    /// Decodes `kv`; `Ok(None)` for keys this agent does not know.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when the value does not decode as the key's record.
    pub fn decode(kv: &KeyValue) -> Result<Option<(RecordKey, Self)>, StoreError> {
        let Some(key) = RecordKey::parse(&kv.key) else {
            return Ok(None);
        };
        let record = match &key {
            RecordKey::App(_) => Self::App(decode(kv, "app")?),
            RecordKey::NodePort(..) => Self::NodePort(decode(kv, "node-port claim")?),
            RecordKey::Route(_) => Self::Route(decode(kv, "route")?),
            RecordKey::Endpoints { .. } => Self::Endpoints(decode(kv, "endpoint list")?),
            RecordKey::Node(_) => Self::Node(decode(kv, "node")?),
            RecordKey::Alive(_) => Self::Alive(decode(kv, "heartbeat")?),
            RecordKey::Subnet(_) => Self::Subnet(decode(kv, "subnet claim")?),
            RecordKey::Demand { .. } => Self::Demand(decode(kv, "demand")?),
            RecordKey::Placement { .. } => Self::Placement(decode(kv, "placement")?),
            RecordKey::Leader(_) => Self::Leader(decode(kv, "leader")?),
            RecordKey::Cert(_) => Self::Cert(decode(kv, "certificate")?),
            RecordKey::Challenge(_) => Self::Challenge(decode(kv, "ACME challenge")?),
            RecordKey::AcmeAccount => Self::AcmeAccount(decode(kv, "ACME account")?),
        };
        Ok(Some((key, record)))
    }
}

fn decode<T: DeserializeOwned>(kv: &KeyValue, what: &'static str) -> Result<T, StoreError> {
    serde_json::from_slice(&kv.value).map_err(|err| StoreError::Corrupt {
        what,
        key: kv.key.clone(),
        reason: err.to_string(),
    })
}

/// Encodes a record for the store.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records encode as JSON")
}

/// `Protocol` as `"tcp"` / `"udp"`.
mod protocol {
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    use crate::config::Protocol;

    pub fn serialize<S: Serializer>(protocol: &Protocol, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(protocol.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        let name = String::deserialize(d)?;
        Protocol::from_name(&name)
            .ok_or_else(|| D::Error::custom(format!("unknown protocol \"{name}\"")))
    }
}

/// Assigned ports as a list of `{service, port_name, port}` (JSON maps need string keys).
mod assigned_ports {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Assigned {
        service: String,
        port_name: String,
        port: u16,
    }

    pub fn serialize<S: Serializer>(
        ports: &BTreeMap<(String, String), u16>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let list: Vec<Assigned> = ports
            .iter()
            .map(|((service, port_name), &port)| Assigned {
                service: service.clone(),
                port_name: port_name.clone(),
                port,
            })
            .collect();
        list.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<(String, String), u16>, D::Error> {
        Ok(Vec::<Assigned>::deserialize(d)?
            .into_iter()
            .map(|a| ((a.service, a.port_name), a.port))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_unknown_keys_are_skipped() {
        let keys = [
            RecordKey::App("web".into()),
            RecordKey::NodePort(Protocol::Udp, 27015),
            RecordKey::Route("*.example.com".into()),
            RecordKey::Endpoints {
                app: "web".into(),
                service: "main".into(),
                node: "node-1.example".into(),
            },
            RecordKey::Node("node-1.example".into()),
            RecordKey::Alive("n2".into()),
            RecordKey::Subnet("10.88.3.0/24".into()),
            RecordKey::Placement {
                app: "web".into(),
                service: "main".into(),
            },
            RecordKey::Demand {
                app: "web".into(),
                service: "main".into(),
                node: "n2".into(),
            },
            RecordKey::Leader(SCHEDULER.into()),
            RecordKey::Cert("*.example.com".into()),
            RecordKey::Challenge("abc-DEF_123".into()),
            RecordKey::AcmeAccount,
        ];
        for key in keys {
            assert_eq!(RecordKey::parse(&key.to_string()), Some(key));
        }
        for unknown in [
            "apps",
            "apps/a/b",
            "nodeports/sctp/1",
            "nodeports/tcp/x",
            "future/x",
        ] {
            assert_eq!(RecordKey::parse(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn records_decode_by_key_and_bad_values_are_corrupt() {
        let app = AppRecord {
            name: "web".into(),
            source_name: "app.toml".into(),
            toml: "name = \"web\"\n".into(),
            version: 2,
            deployed_at: 1_700_000_000,
            bundle: Some("ab".repeat(32)),
            directory: None,
            assigned_ports: BTreeMap::from([(("main".into(), "admin".into()), 20001)]),
        };
        let kv = KeyValue {
            key: "apps/web".into(),
            value: encode(&app),
            mod_revision: 3,
        };
        assert_eq!(
            Record::decode(&kv).unwrap(),
            Some((RecordKey::App("web".into()), Record::App(app)))
        );
        let bad = KeyValue {
            key: "nodeports/tcp/7000".into(),
            value: b"{\"node_port\": 7000}".to_vec(),
            mod_revision: 4,
        };
        let err = Record::decode(&bad).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the store holds an invalid node-port claim at nodeports/tcp/7000"),
            "{err}"
        );
    }
}
