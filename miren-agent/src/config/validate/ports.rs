//! Service ports: simple fields or the ports array, node ports, uniqueness.

use std::collections::{BTreeMap, HashMap};

use toml::{Spanned, Value};

use super::Validator;
use crate::config::diagnostic::Span;
use crate::config::keys::suggest;
use crate::config::raw::{Leaf, RawPort, RawService};
use crate::config::types::{PortKind, PortSpec, Protocol, ServiceConfig};

impl Validator<'_> {
    pub(super) fn ports(&mut self, service: &str, raw: &RawService) -> Vec<PortSpec> {
        let simple = [
            ("port", &raw.port),
            ("port_name", &raw.port_name),
            ("port_type", &raw.port_type),
        ];
        let mut checked = Vec::new();
        if let Some(list) = &raw.ports {
            for (key, leaf) in simple {
                if let Some(leaf) = leaf {
                    self.error(
                        leaf.span(),
                        format!("`{key}` cannot be combined with [[services.{service}.ports]]"),
                        format!("move it into a [[services.{service}.ports]] entry, or remove the ports array"),
                    );
                }
            }
            for entry in list.get_ref() {
                checked.extend(self.port_entry(entry));
            }
        } else if let Some(leaf) = simple.iter().find_map(|(_, leaf)| leaf.as_ref()) {
            checked.extend(self.simple_port(leaf.span(), raw));
        }
        self.ports_unique(service, &checked);
        checked.into_iter().map(|c| c.spec).collect()
    }

    fn port_entry(&mut self, entry: &Spanned<RawPort>) -> Option<CheckedPort> {
        let (span, raw) = (entry.span(), entry.get_ref());
        let kind = self.port_kind(&raw.kind, "type");
        let name = match &raw.name {
            Some(leaf) => self.port_name(leaf, "name"),
            None => {
                self.error(
                    span.clone(),
                    "port entry has no `name`",
                    "add name = \"...\" to this entry, e.g. name = \"game\"; names are unique within a service",
                );
                None
            }
        };
        let port = self.port_number(&raw.port);
        let node_port = raw
            .node_port
            .as_ref()
            .and_then(|leaf| self.node_port(leaf, kind));
        let (Some(kind), Some((name, name_span)), Some((port, port_span))) = (kind, name, port)
        else {
            return None;
        };
        Some(CheckedPort {
            spec: PortSpec {
                name,
                port,
                kind,
                node_port,
                span: span.clone(),
                node_port_span: raw.node_port.as_ref().map(Spanned::span),
            },
            name_span,
            port_span: port_span.unwrap_or(span),
        })
    }

    fn simple_port(&mut self, span: Span, raw: &RawService) -> Option<CheckedPort> {
        let kind = self.port_kind(&raw.port_type, "port_type");
        let name = raw
            .port_name
            .as_ref()
            .and_then(|leaf| self.port_name(leaf, "port_name"));
        let port = self.port_number(&raw.port);
        let (Some(kind), Some((port, port_span))) = (kind, port) else {
            return None;
        };
        let (name, name_span) = match (&raw.port_name, name) {
            (None, _) => (kind.as_str().to_owned(), span.clone()),
            (Some(_), name) => name?,
        };
        Some(CheckedPort {
            spec: PortSpec {
                name,
                port,
                kind,
                node_port: None,
                span: span.clone(),
                node_port_span: None,
            },
            name_span,
            port_span: port_span.unwrap_or(span),
        })
    }

    fn port_kind(&mut self, leaf: &Leaf, key: &str) -> Option<PortKind> {
        let Some(leaf) = leaf else {
            return Some(PortKind::Http);
        };
        match self.string(leaf, key, "\"tcp\"")?.as_str() {
            "http" => Some(PortKind::Http),
            "tcp" => Some(PortKind::Tcp),
            "udp" => Some(PortKind::Udp),
            other => {
                let help = match suggest(other, &["http", "tcp", "udp"]) {
                    Some(best) => {
                        format!("did you mean \"{best}\"? port types are http, tcp and udp")
                    }
                    None => "use one of http, tcp or udp".to_owned(),
                };
                self.error(leaf.span(), format!("unknown port type \"{other}\""), help);
                None
            }
        }
    }

    fn port_name(&mut self, leaf: &Spanned<Value>, key: &str) -> Option<(String, Span)> {
        let name = self.string(leaf, key, "\"game\"")?;
        if name.is_empty() {
            self.error(
                leaf.span(),
                format!("`{key}` must not be empty"),
                "give the port a short name, e.g. \"http\" or \"game\"",
            );
            return None;
        }
        Some((name, leaf.span()))
    }

    /// `Some((None, None))` when the port is left for the agent to assign.
    fn port_number(&mut self, leaf: &Leaf) -> Option<(Option<u16>, Option<Span>)> {
        let Some(leaf) = leaf else {
            return Some((None, None));
        };
        let n = self.integer(leaf, "port", "8080")?;
        match u16::try_from(n) {
            Ok(port) if port > 0 => Some((Some(port), Some(leaf.span()))),
            _ => {
                self.error(
                    leaf.span(),
                    format!("port {n} is out of range"),
                    "use a port from 1 to 65535, or leave `port` out to have one assigned",
                );
                None
            }
        }
    }

    /// Checks a node port; `kind` is `None` when the port's type was invalid.
    fn node_port(&mut self, leaf: &Spanned<Value>, kind: Option<PortKind>) -> Option<u16> {
        let n = self.integer(leaf, "node_port", "27015")?;
        let Some(port) = u16::try_from(n).ok().filter(|p| *p > 0) else {
            self.error(
                leaf.span(),
                format!("node_port {n} is out of range"),
                "use a node_port from 1 to 65535",
            );
            return None;
        };
        let before = self.diags.len();
        if kind == Some(PortKind::Http) {
            self.error(
                leaf.span(),
                "node_port is not allowed on an http port",
                "http ports are reached through routes (`miren route set HOST APP`); set type = \"tcp\" or \"udp\" to publish a raw port",
            );
        }
        if let Some(message) = self.ctx.node_port_conflict(port) {
            self.error(leaf.span(), message, "choose another node_port");
        }
        (self.diags.len() == before).then_some(port)
    }

    /// Port names and `(port, protocol)` pairs are unique within a service.
    fn ports_unique(&mut self, service: &str, ports: &[CheckedPort]) {
        let mut names: HashMap<&str, &Span> = HashMap::new();
        let mut numbers: HashMap<(u16, Protocol), &Span> = HashMap::new();
        for p in ports {
            if let Some(first) = names.insert(&p.spec.name, &p.name_span) {
                let line = self.src.line(first.start);
                self.error(
                    p.name_span.clone(),
                    format!(
                        "duplicate port name \"{}\" in service \"{service}\"",
                        p.spec.name
                    ),
                    format!("the first one is on line {line}; give each port a unique name"),
                );
                names.insert(&p.spec.name, first);
            }
            let Some(number) = p.spec.port else { continue };
            let protocol = p.spec.kind.protocol();
            if let Some(first) = numbers.insert((number, protocol), &p.port_span) {
                let line = self.src.line(first.start);
                self.error(
                    p.port_span.clone(),
                    format!("port {number}/{protocol} is declared twice in service \"{service}\""),
                    format!("the first one is on line {line} (http and tcp ports both use tcp); use a different port number"),
                );
                numbers.insert((number, protocol), first);
            }
        }
    }

    /// `(node_port, protocol)` pairs are unique within the app, reported in file order.
    pub(super) fn node_ports_unique(&mut self, services: &BTreeMap<String, ServiceConfig>) {
        let mut claims: Vec<_> = services
            .values()
            .flat_map(|s| s.ports.iter().map(move |p| (s, p)))
            .filter_map(|(s, p)| {
                let node_port = p.node_port?;
                let span = p.node_port_span.clone()?;
                Some((
                    span,
                    node_port,
                    p.kind.protocol(),
                    s.name.as_str(),
                    p.name.as_str(),
                ))
            })
            .collect();
        claims.sort_by_key(|c| c.0.start);
        let mut seen: HashMap<(u16, Protocol), (usize, &str, &str)> = HashMap::new();
        for (span, node_port, protocol, service, port) in claims {
            if let Some((start, first_service, first_port)) = seen.get(&(node_port, protocol)) {
                let line = self.src.line(*start);
                self.error(
                    span,
                    format!("node_port {node_port}/{protocol} is published twice in this app"),
                    format!("service \"{first_service}\" port \"{first_port}\" already publishes it on line {line}; choose another node_port"),
                );
            } else {
                seen.insert((node_port, protocol), (span.start, service, port));
            }
        }
    }
}

struct CheckedPort {
    spec: PortSpec,
    name_span: Span,
    port_span: Span,
}
