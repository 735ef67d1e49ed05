//! Text output of `miren`: aligned columns, one renderer per response type.

use std::fmt::Write as _;

use serde_json::json;

use crate::api::types::{
    AppDetail, AppSummary, CertInfo, LogChunk, NodeInfo, NodePortInfo, PortTraffic, RouteImport,
    RouteInfo, SECRET_MASK, ServiceDetail, ServiceEndpoints, Status, is_secret_key,
};
use crate::config::AppConfig;

/// A column of a table of `T`: header and cell text.
type Column<T> = (&'static str, fn(&T) -> String);

/// Rows of cells printed with aligned columns (two spaces apart, no trailing blanks).
#[derive(Debug, Default)]
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table of `items` with a header row; one column per entry of `columns`.
    fn of<T>(columns: &[Column<T>], items: &[T]) -> Self {
        let mut table = Self::default();
        table.row(
            columns
                .iter()
                .map(|(header, _)| (*header).to_owned())
                .collect(),
        );
        for item in items {
            table.row(columns.iter().map(|(_, cell)| cell(item)).collect());
        }
        table
    }

    /// `key  value` lines with the values aligned.
    fn fields<const N: usize>(fields: [(&str, String); N]) -> Self {
        let mut table = Self::default();
        for (key, value) in fields {
            table.row(vec![key.to_owned(), value]);
        }
        table
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders every row on its own line, each prefixed with `indent`.
    fn render(&self, indent: &str) -> String {
        let mut widths = Vec::<usize>::new();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                let width = cell.chars().count();
                match widths.get_mut(i) {
                    Some(w) => *w = (*w).max(width),
                    None => widths.push(width),
                }
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = indent.to_owned();
            for (cell, width) in row.iter().zip(&widths) {
                let _ = write!(line, "{cell:<width$}  ");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A table of `items`, or the line `empty` when there are none.
fn listing<T>(columns: &[Column<T>], items: &[T], empty: &str) -> String {
    if items.is_empty() {
        format!("{empty}\n")
    } else {
        Table::of(columns, items).render("")
    }
}

/// `miren status`.
pub fn status(status: &Status) -> String {
    let dataplane = &status.dataplane;
    Table::fields([
        (
            "agent",
            format!("{}, up {}", status.version, duration(status.uptime_secs)),
        ),
        ("node", status.node.clone()),
        ("store", status.store.clone()),
        (
            "scheduler",
            status.scheduler.clone().unwrap_or_else(|| "none".into()),
        ),
        ("state dir", status.state_dir.clone()),
        (
            "dataplane",
            format!("{} ({})", dataplane.mode, dataplane.reason),
        ),
        ("apps", status.apps.to_string()),
        ("routes", status.routes.to_string()),
        ("node ports", status.node_ports.to_string()),
    ])
    .render("")
}

/// `miren apps`.
pub fn apps(apps: &[AppSummary]) -> String {
    const COLUMNS: &[Column<AppSummary>] = &[
        ("NAME", |a| a.name.clone()),
        ("VERSION", |a| a.version.to_string()),
        ("DEPLOYED", |a| unix_time(a.deployed_at)),
        ("SERVICES", |a| a.services.join(",")),
    ];
    listing(COLUMNS, apps, "no apps deployed")
}

/// `miren deploy`: what was deployed, with the ports the agent assigned.
pub fn deployed(app: &AppDetail) -> String {
    format!(
        "deployed app {} version {}\n\n{}",
        app.name,
        app.version,
        services_and_routes(app, false)
    )
}

/// `miren app show`: the app with its services, ports, environment and routes.
pub fn app_detail(app: &AppDetail) -> String {
    let fields = Table::fields([
        ("app", app.name.clone()),
        ("version", app.version.to_string()),
        ("deployed", unix_time(app.deployed_at)),
        ("source", app.source_name.clone()),
    ]);
    let mut out = format!("{}\n{}", fields.render(""), services_and_routes(app, true));
    let masked = app.services.iter().any(|s| {
        s.env
            .iter()
            .any(|(key, value)| value == SECRET_MASK && is_secret_key(key))
    });
    if masked {
        let _ = writeln!(
            out,
            "secret values are hidden; show them with `miren app show {} --show-secrets`",
            app.name
        );
    }
    out
}

/// `miren app rm`.
pub fn removed_app(app: &AppDetail) -> String {
    format!("removed app {} (version {})\n", app.name, app.version)
}

/// One block per service (ports, optionally the environment), then the routes.
fn services_and_routes(app: &AppDetail, with_env: bool) -> String {
    let mut out = String::new();
    for service in &app.services {
        out.push_str(&service_block(service, with_env));
        out.push('\n');
    }
    if app.routes.is_empty() {
        out.push_str("routes: none\n");
    } else {
        out.push_str("routes:\n");
        const COLUMNS: &[Column<RouteInfo>] = &[
            ("HOST", |r| r.host.clone()),
            ("SERVICE", |r| r.service.clone()),
        ];
        out.push_str(&Table::of(COLUMNS, &app.routes).render("  "));
    }
    out
}

fn service_block(service: &ServiceDetail, with_env: bool) -> String {
    let mut out = format!("service {} ({}", service.name, service.concurrency);
    if let Some(command) = &service.command {
        let _ = write!(out, ", command: {command}");
    }
    out.push_str(")\n");
    if !service.placed_on.is_empty() {
        let _ = writeln!(out, "  placed on: {}", service.placed_on.join(", "));
    }
    if let Some(instances) = &service.instances {
        let _ = write!(
            out,
            "  instances: {} running, {} ready, {} restarts",
            instances.running, instances.ready, instances.restarts
        );
        if let Some(exit) = &instances.last_exit {
            let _ = write!(out, " (last exit: {exit})");
        }
        if instances.crash_loop {
            out.push_str(" — CRASH LOOP: instances exit soon after starting; see `miren logs`");
        }
        out.push('\n');
        if let Some(error) = &instances.error {
            let _ = writeln!(out, "  cannot start instances: {error}");
        }
    }
    if service.ports.is_empty() {
        out.push_str("  no ports\n");
    } else {
        let mut table = Table::default();
        table.row(
            ["PORT_NAME", "TYPE", "PORT", "NODE_PORTS"]
                .map(str::to_owned)
                .to_vec(),
        );
        for port in &service.ports {
            let target = if port.assigned {
                format!("{} (assigned)", port.port)
            } else {
                port.port.to_string()
            };
            let node_ports = port.node_ports.iter().map(u16::to_string).collect();
            table.row(vec![
                port.name.clone(),
                port.kind.clone(),
                target,
                list_or_dash(node_ports),
            ]);
        }
        out.push_str(&table.render("  "));
    }
    if with_env && !service.env.is_empty() {
        out.push_str("  env:\n");
        for (key, value) in &service.env {
            let _ = writeln!(out, "    {key}={value}");
        }
    }
    out
}

/// `miren route list`.
pub fn routes(routes: &[RouteInfo]) -> String {
    const COLUMNS: &[Column<RouteInfo>] = &[
        ("HOST", |r| r.host.clone()),
        ("APP", |r| r.app.clone()),
        ("SERVICE", |r| r.service.clone()),
        ("TIMEOUT", |r| route_timeout(r.timeout_ms)),
    ];
    listing(COLUMNS, routes, "no routes")
}

/// `miren nodes`.
pub fn nodes(nodes: &[NodeInfo]) -> String {
    const COLUMNS: &[Column<NodeInfo>] = &[
        ("NAME", |n| n.name.clone()),
        ("ADDRESS", |n| dash_if_empty(n.addresses.join(","))),
        ("STATUS", |n| n.status.clone()),
        ("INSTANCES", |n| n.instances.to_string()),
        ("SUBNET", |n| n.subnet.clone()),
        ("LAST HEARTBEAT", |n| {
            n.last_heartbeat.map_or("-".into(), unix_time)
        }),
    ];
    listing(COLUMNS, nodes, "no nodes")
}

/// `miren node show|cordon|uncordon`.
pub fn node_detail(node: &NodeInfo) -> String {
    Table::fields([
        ("node", node.name.clone()),
        ("addresses", dash_if_empty(node.addresses.join(", "))),
        ("status", node.status.clone()),
        ("instances", node.instances.to_string()),
        ("subnet", node.subnet.clone()),
        (
            "last heartbeat",
            node.last_heartbeat.map_or("-".into(), unix_time),
        ),
    ])
    .render("")
}

/// `miren node rm`.
pub fn node_removed(node: &NodeInfo) -> String {
    format!("removed node {} (subnet {})\n", node.name, node.subnet)
}

fn dash_if_empty(text: String) -> String {
    if text.is_empty() { "-".into() } else { text }
}

/// `miren cert list`.
pub fn certs(certs: &[CertInfo]) -> String {
    const COLUMNS: &[Column<CertInfo>] = &[
        ("HOST", |c| c.host.clone()),
        ("SOURCE", |c| c.source.to_string()),
        ("EXPIRES", |c| c.not_after.clone()),
        ("SANS", |c| c.sans.join(",")),
    ];
    listing(COLUMNS, certs, "no certificates")
}

/// `miren cert set`.
pub fn cert_set(cert: &CertInfo) -> String {
    format!(
        "certificate for {} stored (expires {}, names {})\n",
        cert.host,
        cert.not_after,
        cert.sans.join(", ")
    )
}

/// `miren route set|add`.
pub fn route_set(route: &RouteInfo) -> String {
    format!(
        "route {} -> app {} service {} (upstream timeout {})\n",
        route.host,
        route.app,
        route.service,
        route_timeout(route.timeout_ms)
    )
}

/// `miren route import`.
pub fn routes_imported(import: &RouteImport) -> String {
    format!(
        "imported {} routes from {} ({} replaced an existing route)\n",
        import.routes, import.file, import.replaced
    )
}

/// A route's upstream timeout, or the ingress default.
fn route_timeout(timeout_ms: Option<u64>) -> String {
    match timeout_ms {
        Some(ms) if ms % 1000 == 0 => format!("{}s", ms / 1000),
        Some(ms) => format!("{ms}ms"),
        None => "60s (default)".into(),
    }
}

/// `miren route rm`.
pub fn route_removed(route: &RouteInfo) -> String {
    format!(
        "removed route {} (was app {} service {})\n",
        route.host, route.app, route.service
    )
}

/// Columns of the node-port table; add an entry here to show a new [`NodePortInfo`] field.
const NODE_PORT_COLUMNS: &[Column<NodePortInfo>] = &[
    ("NODE_PORT/PROTO", |p| {
        format!("{}/{}", p.node_port, p.protocol)
    }),
    ("APP", |p| p.app.clone()),
    ("SERVICE", |p| p.service.clone()),
    ("PORT_NAME", |p| p.port_name.clone()),
    ("TARGET", |p| p.target_port.to_string()),
    ("ENDPOINTS", |p| p.endpoints.len().to_string()),
    ("RX", |p| traffic(p, |t| rate(t.rx_packets, t.rx_pps))),
    ("RX_BYTES", |p| {
        traffic(p, |t| rate_bytes(t.rx_bytes, t.rx_bps))
    }),
    ("TX", |p| traffic(p, |t| rate(t.tx_packets, t.tx_pps))),
    ("TX_BYTES", |p| {
        traffic(p, |t| rate_bytes(t.tx_bytes, t.tx_bps))
    }),
    ("RX_V4/V6", |p| traffic(p, |t| split(t, |f| f.rx_packets))),
    ("TX_V4/V6", |p| traffic(p, |t| split(t, |f| f.tx_packets))),
    ("FLOWS", |p| traffic(p, |t| t.flows.to_string())),
    ("DROPS", |p| traffic(p, |t| t.drops.to_string())),
    ("STATUS", |p| p.status.clone()),
];

/// A traffic cell, `-` without counters.
fn traffic(port: &NodePortInfo, cell: impl Fn(&PortTraffic) -> String) -> String {
    port.traffic.as_ref().map_or_else(|| "-".to_owned(), cell)
}

/// A count's IPv4 and IPv6 parts, `1000/500`; `-` without per-family counts.
fn split(traffic: &PortTraffic, count: impl Fn(&PortTraffic) -> u64) -> String {
    if traffic.by_family.is_empty() {
        return "-".to_owned();
    }
    let part = |family| traffic.by_family.get(family).map_or(0, &count);
    format!("{}/{}", part("ipv4"), part("ipv6"))
}

/// `1500 (50/s)`.
fn rate(count: u64, per_sec: f64) -> String {
    format!("{count} ({per_sec:.0}/s)")
}

/// `1.5MB (12.0kB/s)` in decimal units.
fn rate_bytes(bytes: u64, per_sec: f64) -> String {
    format!("{} ({}/s)", human_bytes(bytes as f64), human_bytes(per_sec))
}

fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// `miren ports` and `miren ports edit`.
pub fn node_ports(ports: &[NodePortInfo]) -> String {
    listing(NODE_PORT_COLUMNS, ports, "no published node ports")
}

/// `miren ports --by-node`: the table, then each node's own counts of every node port.
pub fn node_ports_by_node(ports: &[NodePortInfo]) -> String {
    /// One node's counts of one node port.
    struct NodeRow {
        port: String,
        node: String,
        traffic: PortTraffic,
    }
    const COLUMNS: &[Column<NodeRow>] = &[
        ("NODE_PORT/PROTO", |r| r.port.clone()),
        ("NODE", |r| r.node.clone()),
        ("RX", |r| rate(r.traffic.rx_packets, r.traffic.rx_pps)),
        ("RX_BYTES", |r| {
            rate_bytes(r.traffic.rx_bytes, r.traffic.rx_bps)
        }),
        ("TX", |r| rate(r.traffic.tx_packets, r.traffic.tx_pps)),
        ("TX_BYTES", |r| {
            rate_bytes(r.traffic.tx_bytes, r.traffic.tx_bps)
        }),
        ("FLOWS", |r| r.traffic.flows.to_string()),
        ("DROPS", |r| r.traffic.drops.to_string()),
    ];
    let rows: Vec<NodeRow> = ports
        .iter()
        .flat_map(|port| {
            port.by_node.iter().map(|(node, traffic)| NodeRow {
                port: format!("{}/{}", port.node_port, port.protocol),
                node: node.clone(),
                traffic: traffic.clone(),
            })
        })
        .collect();
    format!(
        "{}\nby node:\n{}",
        node_ports(ports),
        listing(
            COLUMNS,
            &rows,
            "no counts from the nodes (no data plane, or not a cluster)"
        )
    )
}

/// `miren logs`: `INSTANCE | LINE`, with `timestamps` `TIME INSTANCE | LINE` (`-` for lines
/// written before logs had timestamps).
pub fn log_lines(chunk: &LogChunk, timestamps: bool) -> String {
    let mut out = String::new();
    for l in &chunk.lines {
        if timestamps {
            out.push_str(l.time.as_deref().unwrap_or("-"));
            out.push(' ');
        }
        let _ = writeln!(out, "{} | {}", l.instance, l.line);
    }
    out
}

/// `miren endpoints`: one line per instance address.
pub fn endpoints(services: &[ServiceEndpoints]) -> String {
    let mut table = Table::default();
    table.row(
        ["SERVICE", "PORT_NAME", "ENDPOINT", "NODE"]
            .map(str::to_owned)
            .to_vec(),
    );
    let dash = || "-".to_owned();
    for service in services {
        if service.endpoints.is_empty() {
            table.row(vec![service.service.clone(), dash(), dash(), dash()]);
        }
        for (port_name, addrs) in &service.endpoints {
            if addrs.is_empty() {
                table.row(vec![
                    service.service.clone(),
                    port_name.clone(),
                    dash(),
                    dash(),
                ]);
            }
            for addr in addrs {
                let node = service
                    .node_of
                    .get(&addr.ip())
                    .cloned()
                    .unwrap_or_else(dash);
                table.row(vec![
                    service.service.clone(),
                    port_name.clone(),
                    addr.to_string(),
                    node,
                ]);
            }
        }
    }
    table.render("")
}

/// `miren validate` on success: the app and the ports it declares.
pub fn validated(app: &AppConfig) -> String {
    let count = app.services.len();
    let plural = if count == 1 { "" } else { "s" };
    let mut out = format!("ok: app {} ({count} service{plural})\n", app.name);
    let mut table = Table::default();
    table.row(
        ["SERVICE", "PORT_NAME", "TYPE", "PORT", "NODE_PORT"]
            .map(str::to_owned)
            .to_vec(),
    );
    for service in app.services.values() {
        for port in &service.ports {
            table.row(vec![
                service.name.clone(),
                port.name.clone(),
                port.kind.to_string(),
                port.port
                    .map_or_else(|| "assigned at deploy".to_owned(), |p| p.to_string()),
                port.node_port
                    .map_or_else(|| "-".to_owned(), |p| p.to_string()),
            ]);
        }
    }
    if table.rows.len() > 1 {
        out.push_str(&table.render("  "));
    }
    out
}

/// JSON of `miren validate`: the app and its declared ports (`port` is null when the agent
/// assigns it at deploy).
pub fn validated_json(app: &AppConfig) -> serde_json::Value {
    let services: Vec<_> = app
        .services
        .values()
        .map(|service| {
            let ports: Vec<_> = service
                .ports
                .iter()
                .map(|p| {
                    json!({
                        "name": p.name,
                        "type": p.kind.as_str(),
                        "port": p.port,
                        "node_port": p.node_port,
                    })
                })
                .collect();
            json!({ "name": service.name, "ports": ports })
        })
        .collect();
    json!({ "app": app.name, "services": services })
}

fn list_or_dash(items: Vec<String>) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

/// `3d 4h`, `2h 5m`, `5m 3s` or `12s`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// Unix time as `YYYY-MM-DD HH:MM:SS UTC` (proleptic Gregorian calendar).
fn unix_time(secs: u64) -> String {
    // Days since 0000-03-01, after Howard Hinnant's `civil_from_days`.
    let z = secs / 86_400 + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::types::{DataplaneStatus, PortInfo};
    use crate::config::{Source, ValidationContext, parse_deployable};

    fn node_port(node_port: u16, protocol: &str, endpoints: &[&str]) -> NodePortInfo {
        NodePortInfo {
            node_port,
            protocol: protocol.to_owned(),
            app: "dns".to_owned(),
            service: "resolver".to_owned(),
            port_name: format!("dns-{protocol}"),
            target_port: 5353,
            endpoints: endpoints.iter().map(|e| e.parse().expect("addr")).collect(),
            status: "ok".to_owned(),
            traffic: None,
            by_node: BTreeMap::new(),
        }
    }

    /// Traffic of `rx` and `tx` packets, without rates or bytes.
    fn traffic(rx_packets: u64, tx_packets: u64) -> PortTraffic {
        PortTraffic {
            rx_packets,
            tx_packets,
            ..PortTraffic::default()
        }
    }

    #[test]
    fn node_port_table() {
        let ports = [
            NodePortInfo {
                traffic: Some(PortTraffic {
                    rx_packets: 1500,
                    rx_bytes: 1_234_567,
                    tx_packets: 1400,
                    tx_bytes: 999,
                    flows: 12,
                    drops: 1,
                    rx_pps: 50.4,
                    rx_bps: 12_345.0,
                    tx_pps: 49.6,
                    tx_bps: 33.0,
                    by_family: BTreeMap::from([
                        ("ipv4".to_owned(), traffic(1000, 900)),
                        ("ipv6".to_owned(), traffic(500, 500)),
                    ]),
                }),
                ..node_port(53, "udp", &["10.88.0.2:5353", "10.88.0.3:5353"])
            },
            NodePortInfo {
                // An agent without per-family counts.
                traffic: Some(traffic(7, 7)),
                ..node_port(54, "udp", &[])
            },
            NodePortInfo {
                status: "error: no XDP on eth0".to_owned(),
                ..node_port(53, "tcp", &[])
            },
        ];
        assert_eq!(
            node_ports(&ports),
            "\
NODE_PORT/PROTO  APP  SERVICE   PORT_NAME  TARGET  ENDPOINTS  RX           RX_BYTES          TX           TX_BYTES      RX_V4/V6  TX_V4/V6  FLOWS  DROPS  STATUS
53/udp           dns  resolver  dns-udp    5353    2          1500 (50/s)  1.2MB (12.3kB/s)  1400 (50/s)  999B (33B/s)  1000/500  900/500   12     1      ok
54/udp           dns  resolver  dns-udp    5353    0          7 (0/s)      0B (0B/s)         7 (0/s)      0B (0B/s)     -         -         0      0      ok
53/tcp           dns  resolver  dns-tcp    5353    0          -            -                 -            -             -         -         -      -      error: no XDP on eth0
"
        );
        assert_eq!(node_ports(&[]), "no published node ports\n");
    }

    #[test]
    fn deployed_app() {
        let app = AppDetail {
            name: "game".to_owned(),
            version: 2,
            deployed_at: 1_700_000_000,
            source_name: "./.miren/app.toml".to_owned(),
            services: vec![ServiceDetail {
                name: "server".to_owned(),
                command: Some("./server".to_owned()),
                concurrency: "fixed 1".to_owned(),
                instances: None,
                placed_on: Vec::new(),
                ports: vec![
                    PortInfo {
                        name: "admin".to_owned(),
                        kind: "http".to_owned(),
                        port: 30001,
                        assigned: true,
                        node_ports: vec![],
                    },
                    PortInfo {
                        name: "game".to_owned(),
                        kind: "udp".to_owned(),
                        port: 27015,
                        assigned: false,
                        node_ports: vec![27015, 27016],
                    },
                ],
                env: BTreeMap::from([("PORT".to_owned(), "30001".to_owned())]),
            }],
            routes: vec![RouteInfo {
                host: "admin.example.com".to_owned(),
                app: "game".to_owned(),
                service: "server".to_owned(),
                timeout_ms: None,
            }],
        };
        assert_eq!(
            deployed(&app),
            "\
deployed app game version 2

service server (fixed 1, command: ./server)
  PORT_NAME  TYPE  PORT              NODE_PORTS
  admin      http  30001 (assigned)  -
  game       udp   27015             27015,27016

routes:
  HOST               SERVICE
  admin.example.com  server
"
        );
        let shown = app_detail(&app);
        assert!(
            shown.starts_with("app       game\nversion   2\ndeployed  2023-11-14 22:13:20 UTC\n")
        );
        assert!(shown.contains("  env:\n    PORT=30001\n"), "{shown}");
        assert!(!shown.contains("secret values are hidden"), "{shown}");
    }

    #[test]
    fn masked_secrets_are_shown_masked_with_a_hint() {
        let mut app = AppDetail {
            name: "shop".to_owned(),
            version: 1,
            deployed_at: 0,
            source_name: "app.toml".to_owned(),
            services: vec![ServiceDetail {
                name: "web".to_owned(),
                command: None,
                concurrency: "fixed 1".to_owned(),
                ports: vec![],
                env: BTreeMap::from([
                    ("DB_PASSWORD".to_owned(), "hunter2".to_owned()),
                    ("api_key".to_owned(), "k-123".to_owned()),
                    ("LOG_LEVEL".to_owned(), "info".to_owned()),
                ]),
                instances: None,
                placed_on: Vec::new(),
            }],
            routes: vec![],
        };
        let plain = app_detail(&app);
        assert!(plain.contains("    DB_PASSWORD=hunter2\n"), "{plain}");
        assert!(!plain.contains("hidden"), "{plain}");
        app.mask_secrets();
        let shown = app_detail(&app);
        assert!(
            shown.contains(
                "  env:\n    DB_PASSWORD=********\n    LOG_LEVEL=info\n    api_key=********\n"
            ),
            "{shown}"
        );
        assert!(
            shown.ends_with(
                "secret values are hidden; show them with `miren app show shop --show-secrets`\n"
            ),
            "{shown}"
        );
    }

    #[test]
    fn status_and_time_formats() {
        let text = status(&Status {
            version: "0.1.0".to_owned(),
            uptime_secs: 7_500,
            state_dir: "/var/lib/miren".to_owned(),
            node: "vm1".to_owned(),
            store: "sqlite at /var/lib/miren/store.db".to_owned(),
            scheduler: Some("vm1".to_owned()),
            apps: 3,
            routes: 1,
            node_ports: 4,
            dataplane: DataplaneStatus {
                mode: "nft".to_owned(),
                reason: "XDP unavailable".to_owned(),
            },
            max_bundle_bytes: 256 << 20,
        });
        assert!(text.starts_with(
            "agent       0.1.0, up 2h 5m\nnode        vm1\nstore       sqlite at /var/lib/miren/store.db\nscheduler   vm1\nstate dir   /var/lib/miren\n"
        ));
        assert!(text.contains("\ndataplane   nft (XDP unavailable)\n"));
        assert_eq!(unix_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(unix_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(unix_time(4_102_444_799), "2099-12-31 23:59:59 UTC");
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
    }

    #[test]
    fn endpoints_one_line_per_address() {
        let services = [
            ServiceEndpoints {
                service: "web".to_owned(),
                endpoints: BTreeMap::from([(
                    "http".to_owned(),
                    vec!["10.88.0.2:3000".parse().expect("addr")],
                )]),
                node_of: BTreeMap::from([("10.88.0.2".parse().expect("ip"), "n1".to_owned())]),
            },
            ServiceEndpoints {
                service: "worker".to_owned(),
                ..ServiceEndpoints::default()
            },
        ];
        assert_eq!(
            endpoints(&services),
            "SERVICE  PORT_NAME  ENDPOINT        NODE\nweb      http       10.88.0.2:3000  n1\nworker   -          -               -\n"
        );
    }

    #[test]
    fn validated_app() {
        let toml = "name = \"echo\"\n[services.echo]\ncommand = \"./echo\"\n[[services.echo.ports]]\nname = \"echo\"\ntype = \"tcp\"\nport = 7000\nnode_port = 7000\n[[services.echo.ports]]\nname = \"admin\"\n";
        let app = parse_deployable(Source::new("app.toml", toml), &ValidationContext::default())
            .expect("valid");
        assert_eq!(
            validated(&app),
            "\
ok: app echo (1 service)
  SERVICE  PORT_NAME  TYPE  PORT                NODE_PORT
  echo     echo       tcp   7000                7000
  echo     admin      http  assigned at deploy  -
"
        );
    }
}
