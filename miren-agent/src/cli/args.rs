//! Command-line arguments of `miren` (clap derive) and the parsers of node-port specs.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::api::types::{PublishSpec, UnpublishSpec};

/// API socket used when neither `--socket` nor `MIREN_SOCKET` is set.
pub const DEFAULT_SOCKET: &str = "/run/miren/agent.sock";

/// Environment variable naming the API socket.
pub const SOCKET_ENV: &str = "MIREN_SOCKET";

/// `miren`: the command-line client of the miren agent.
#[derive(Debug, Parser)]
#[command(name = "miren", version, about = "miren command-line client")]
pub struct Cli {
    /// The agent's API socket [env: MIREN_SOCKET] [default: /run/miren/agent.sock].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The API socket: `--socket`, else a non-empty `MIREN_SOCKET`, else [`DEFAULT_SOCKET`].
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .or_else(|| {
                std::env::var_os(SOCKET_ENV)
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned, human-readable text.
    Text,
    /// The agent's JSON response, pretty-printed.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Deploy (create or replace) the app in DIR from DIR/.miren/app.toml.
    Deploy(AppDirArgs),
    /// Check DIR/.miren/app.toml offline, without the agent.
    Validate(AppDirArgs),
    /// List deployed apps.
    Apps,
    /// Show or remove one app.
    #[command(subcommand)]
    App(AppCommand),
    /// Manage HTTP routes (host → app service).
    #[command(subcommand)]
    Route(RouteCommand),
    /// Manage TLS certificates of the HTTPS ingress.
    #[command(subcommand)]
    Cert(CertCommand),
    /// List published node ports, or edit an app's published ports.
    Ports(PortsArgs),
    /// Show the endpoints (instance addresses) of an app's services.
    Endpoints {
        /// App name.
        app: String,
        /// Only this service.
        service: Option<String>,
    },
    /// Show what an app's instances wrote to stdout and stderr.
    Logs {
        /// App name.
        app: String,
        /// Only this service's instances.
        #[arg(long)]
        service: Option<String>,
        /// Keep printing new lines until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Start with the last N lines (of the selected instances together) [default: every
        /// retained line].
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Only lines written during this last duration, e.g. "90s", "10m", "1h30m".
        #[arg(long, value_name = "DUR", value_parser = parse_since)]
        since: Option<String>,
        /// Prefix each line with the time it was written (RFC 3339, UTC).
        #[arg(short, long)]
        timestamps: bool,
    },
    /// Show the agent's status.
    Status,
    /// List the nodes of the cluster: address, status (ready, cordoned, lost), instances,
    /// sandbox subnet and last heartbeat.
    Nodes,
    /// Show or change one node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Check what this node has and lacks for the agent (kernel, eBPF, nftables, the OCI
    /// runtime, cgroups, ports, the store, the cluster), with what to do about each miss.
    Doctor {
        /// The agent's config file [default: /etc/miren/agent.toml if present].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the shell completion script of `miren` (e.g. `source <(miren completion bash)`).
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `miren node …`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Show one node.
    Show {
        /// Node name.
        name: String,
    },
    /// Keep new instances off a node.
    Cordon {
        /// Node name.
        name: String,
    },
    /// Move a node's instances to other nodes, one at a time (each replacement is ready
    /// before the old instance stops), and keep new ones off it.
    Drain {
        /// Node name.
        name: String,
    },
    /// Let a cordoned or drained node take new instances again.
    Uncordon {
        /// Node name.
        name: String,
    },
    /// Remove a lost node (its agent is gone) with its subnet and endpoints.
    Rm {
        /// Node name.
        name: String,
    },
}

/// Where to find an app's `.miren/app.toml`.
#[derive(Debug, Args)]
pub struct AppDirArgs {
    /// App directory containing .miren/app.toml.
    #[arg(value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
}

/// `miren app …`.
#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Show an app's services, ports, environment and routes; values of secret-looking
    /// variables (names containing PASSWORD, SECRET, TOKEN, KEY, CREDENTIAL or PRIVATE) are
    /// shown as ******** unless --show-secrets is given.
    Show {
        /// App name.
        name: String,
        /// Show the values of secret environment variables.
        #[arg(long)]
        show_secrets: bool,
    },
    /// Remove an app.
    Rm {
        /// App name.
        name: String,
    },
}

/// `miren route …`.
#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Route HOST to APP (exact host or `*.domain`).
    Set {
        /// Host name, e.g. `app.example.com` or `*.example.com`.
        host: String,
        /// Target app.
        app: String,
        /// Target service [default: the app's `web` service, else its only HTTP service].
        #[arg(long)]
        service: Option<String>,
        /// Upstream timeout for this route, e.g. "30s", "5m" [default: 60s]; a backend that
        /// takes longer gets the client a 504.
        #[arg(long, value_parser = parse_route_timeout)]
        timeout: Option<std::time::Duration>,
    },
    /// Route HOST to --app APP (same as `route set`).
    Add {
        /// Host name, e.g. `app.example.com` or `*.example.com`.
        host: String,
        /// Target app.
        #[arg(long)]
        app: String,
        /// Target service [default: the app's `web` service, else its only HTTP service].
        #[arg(long)]
        service: Option<String>,
        /// Upstream timeout for this route, e.g. "30s", "5m" [default: 60s]; a backend that
        /// takes longer gets the client a 504.
        #[arg(long, value_parser = parse_route_timeout)]
        timeout: Option<std::time::Duration>,
    },
    /// Remove the route of HOST.
    Rm {
        /// Host name as routed.
        host: String,
    },
    /// List routes.
    List,
    /// Set every route of FILE in one transaction: one `HOST APP [SERVICE] [TIMEOUT]` per
    /// line, blank lines and `#` comments allowed; nothing is applied when any line is wrong.
    Import {
        /// The route file.
        file: std::path::PathBuf,
    },
}

/// `miren logs --since`: a duration as the agent's flags take them, passed on as written.
fn parse_since(text: &str) -> Result<String, String> {
    crate::config::parse_duration(text)
        .map(|_| text.to_owned())
        .ok_or_else(|| format!("\"{text}\" is not a duration; use e.g. 90s, 10m or 1h30m"))
}

fn parse_route_timeout(text: &str) -> Result<std::time::Duration, String> {
    crate::routes::parse_route_timeout(text).ok_or_else(|| {
        format!("\"{text}\" is not a positive duration of at most 24h; use e.g. 30s, 5m or 1h")
    })
}

/// `miren cert …`.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Store a certificate for HOST (exact or `*.domain`), replacing any earlier one; it is
    /// served from the next TLS handshake on and never replaced by ACME.
    Set {
        /// Host name, e.g. `app.example.com` or `*.example.com`.
        host: String,
        /// PEM certificate chain, leaf first.
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// PEM private key of the certificate.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// List stored certificates (operator-provided and ACME-issued).
    List,
}

/// `miren ports [--app APP] [--watch]` or `miren ports edit …`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PortsArgs {
    /// Only this app's node ports.
    #[arg(long)]
    pub app: Option<String>,
    /// Redraw every 2 seconds until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// Also show each node's own counts (in a cluster the table shows their sum).
    #[arg(long)]
    pub by_node: bool,
    /// `edit`.
    #[command(subcommand)]
    pub command: Option<PortsCommand>,
}

/// `miren ports edit`.
#[derive(Debug, Subcommand)]
pub enum PortsCommand {
    /// Publish or unpublish node ports of a deployed service without redeploying.
    Edit(PortsEditArgs),
}

/// Arguments of `miren ports edit`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("changes").required(true).multiple(true).args(["add", "remove"])))]
pub struct PortsEditArgs {
    /// App name.
    pub app: String,
    /// Service to edit.
    #[arg(long)]
    pub service: String,
    /// Publish node port N for the service port with target PORT (default: the service's
    /// only tcp/udp port); repeatable.
    #[arg(long = "add-published", value_name = "N[:PORT][/tcp|udp]", value_parser = parse_publish)]
    pub add: Vec<PublishSpec>,
    /// Unpublish node port N; the protocol is needed only when both are published; repeatable.
    #[arg(long = "rm-published", value_name = "N[/tcp|udp]", value_parser = parse_unpublish)]
    pub remove: Vec<UnpublishSpec>,
}

/// Parses `N[:PORT][/tcp|udp]` (the value of `--add-published`).
///
/// # Errors
/// A message saying which part is wrong, e.g. `node port must be 1-65535`.
pub fn parse_publish(spec: &str) -> Result<PublishSpec, String> {
    let (ports, protocol) = split_protocol(spec)?;
    let (node, target) = match ports.split_once(':') {
        Some((node, target)) => (node, Some(target)),
        None => (ports, None),
    };
    Ok(PublishSpec {
        node_port: parse_port(node, "node port")?,
        port: target.map(|t| parse_port(t, "target port")).transpose()?,
        protocol,
    })
}

/// Parses `N[/tcp|udp]` (the value of `--rm-published`).
///
/// # Errors
/// A message saying which part is wrong, e.g. `node port must be 1-65535`.
pub fn parse_unpublish(spec: &str) -> Result<UnpublishSpec, String> {
    let (port, protocol) = split_protocol(spec)?;
    if port.contains(':') {
        return Err("a target port cannot be given here; use N or N/tcp|udp".to_owned());
    }
    Ok(UnpublishSpec {
        node_port: parse_port(port, "node port")?,
        protocol,
    })
}

/// Splits off and checks an optional `/tcp` or `/udp` suffix (case-insensitive, returned
/// lowercase).
fn split_protocol(spec: &str) -> Result<(&str, Option<String>), String> {
    let Some((ports, protocol)) = spec.split_once('/') else {
        return Ok((spec, None));
    };
    let protocol = protocol.to_ascii_lowercase();
    match protocol.as_str() {
        "tcp" | "udp" => Ok((ports, Some(protocol))),
        "" => Err("protocol is empty; use /tcp or /udp".to_owned()),
        _ => Err(format!("protocol must be tcp or udp, not {protocol:?}")),
    }
}

/// Parses a port number 1-65535 written in plain decimal digits.
fn parse_port(text: &str, what: &str) -> Result<u16, String> {
    if text.is_empty() {
        return Err(format!("{what} is missing"));
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what} {text:?} is not a number"));
    }
    match text.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{what} must be 1-65535")),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn publish(node_port: u16, port: Option<u16>, protocol: Option<&str>) -> PublishSpec {
        PublishSpec {
            node_port,
            port,
            protocol: protocol.map(str::to_owned),
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn publish_specs() {
        let cases = [
            ("7000", publish(7000, None, None)),
            ("7000:7001", publish(7000, Some(7001), None)),
            ("53/udp", publish(53, None, Some("udp"))),
            ("27015:27016/UDP", publish(27015, Some(27016), Some("udp"))),
            ("65535:1/tcp", publish(65535, Some(1), Some("tcp"))),
        ];
        for (spec, want) in cases {
            assert_eq!(parse_publish(spec), Ok(want), "{spec}");
        }
    }

    #[test]
    fn invalid_publish_specs() {
        let cases = [
            ("70000", "node port must be 1-65535"),
            ("0", "node port must be 1-65535"),
            ("", "node port is missing"),
            (":80", "node port is missing"),
            ("7000:", "target port is missing"),
            ("7000:0", "target port must be 1-65535"),
            ("7000:99999/udp", "target port must be 1-65535"),
            ("+7000", "node port \"+7000\" is not a number"),
            ("abc", "node port \"abc\" is not a number"),
            ("7000:x", "target port \"x\" is not a number"),
            ("7000/sctp", "protocol must be tcp or udp, not \"sctp\""),
            ("7000/", "protocol is empty; use /tcp or /udp"),
            (
                "7000/udp/tcp",
                "protocol must be tcp or udp, not \"udp/tcp\"",
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(parse_publish(spec), Err(want.to_owned()), "{spec}");
        }
    }

    #[test]
    fn unpublish_specs() {
        assert_eq!(
            parse_unpublish("7000"),
            Ok(UnpublishSpec {
                node_port: 7000,
                protocol: None
            })
        );
        assert_eq!(
            parse_unpublish("53/udp"),
            Ok(UnpublishSpec {
                node_port: 53,
                protocol: Some("udp".to_owned())
            })
        );
        let cases = [
            ("70000", "node port must be 1-65535"),
            (
                "7000:7000",
                "a target port cannot be given here; use N or N/tcp|udp",
            ),
            ("7000/icmp", "protocol must be tcp or udp, not \"icmp\""),
            (" 7000", "node port \" 7000\" is not a number"),
        ];
        for (spec, want) in cases {
            assert_eq!(parse_unpublish(spec), Err(want.to_owned()), "{spec}");
        }
    }

    #[test]
    fn ports_edit_arguments() {
        let cli = Cli::try_parse_from([
            "miren",
            "ports",
            "edit",
            "game",
            "--service",
            "server",
            "--add-published",
            "27015/udp",
            "--add-published",
            "27016:27015",
            "--rm-published",
            "27020",
            "--output",
            "json",
        ])
        .expect("valid arguments");
        assert_eq!(cli.output, OutputFormat::Json);
        let Command::Ports(PortsArgs {
            command: Some(PortsCommand::Edit(edit)),
            ..
        }) = cli.command
        else {
            panic!("not ports edit: {:?}", cli.command);
        };
        assert_eq!(
            (edit.app.as_str(), edit.service.as_str()),
            ("game", "server")
        );
        assert_eq!(
            edit.add,
            [
                publish(27015, None, Some("udp")),
                publish(27016, Some(27015), None)
            ]
        );
        assert_eq!(edit.remove.len(), 1);
    }

    #[test]
    fn ports_edit_usage_errors() {
        let err = Cli::try_parse_from([
            "miren",
            "ports",
            "edit",
            "game",
            "--service",
            "s",
            "--add-published",
            "70000",
        ])
        .expect_err("out of range");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(
            err.to_string().contains("node port must be 1-65535"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 2);

        let err = Cli::try_parse_from(["miren", "ports", "edit", "game", "--service", "s"])
            .expect_err("no change");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn global_options_before_or_after_the_subcommand() {
        let cli = Cli::try_parse_from(["miren", "--socket", "/tmp/a.sock", "apps"]).expect("ok");
        assert_eq!(cli.socket_path(), PathBuf::from("/tmp/a.sock"));
        let cli =
            Cli::try_parse_from(["miren", "route", "list", "--socket", "/tmp/b.sock"]).expect("ok");
        assert_eq!(cli.socket_path(), PathBuf::from("/tmp/b.sock"));
        assert_eq!(cli.output, OutputFormat::Text);
        let cli = Cli::try_parse_from(["miren", "ports", "--watch", "--app", "irc"]).expect("ok");
        let Command::Ports(ports) = cli.command else {
            panic!("not ports");
        };
        assert!(ports.watch && ports.command.is_none());
        assert_eq!(ports.app.as_deref(), Some("irc"));
    }

    #[test]
    fn cert_forms() {
        let set = Cli::try_parse_from([
            "miren",
            "cert",
            "set",
            "a.example.com",
            "--cert",
            "a.crt",
            "--key",
            "a.key",
        ])
        .expect("ok");
        assert!(matches!(
            set.command,
            Command::Cert(CertCommand::Set { ref host, ref cert, ref key })
                if host == "a.example.com" && cert.as_os_str() == "a.crt" && key.as_os_str() == "a.key"
        ));
        assert!(
            Cli::try_parse_from(["miren", "cert", "set", "a.example.com", "--cert", "a.crt"])
                .is_err()
        );
        let list = Cli::try_parse_from(["miren", "cert", "list", "--output", "json"]).expect("ok");
        assert!(matches!(list.command, Command::Cert(CertCommand::List)));
        assert_eq!(list.output, OutputFormat::Json);
    }

    #[test]
    fn route_forms() {
        let set = Cli::try_parse_from(["miren", "route", "set", "*.example.com", "web-app"])
            .expect("set");
        assert!(matches!(
            set.command,
            Command::Route(RouteCommand::Set { ref host, ref app, service: None, timeout: None })
                if host == "*.example.com" && app == "web-app"
        ));
        let add = Cli::try_parse_from(["miren", "route", "add", "a.example.com", "--app", "x"])
            .expect("add");
        assert!(matches!(
            add.command,
            Command::Route(RouteCommand::Add { .. })
        ));
        assert!(Cli::try_parse_from(["miren", "route", "add", "a.example.com"]).is_err());
    }

    #[test]
    fn route_timeout_is_positive_and_at_most_a_day() {
        assert_eq!(
            parse_route_timeout("24h"),
            Ok(std::time::Duration::from_secs(86_400))
        );
        for bad in ["0s", "25h", "soon"] {
            let err = parse_route_timeout(bad).unwrap_err();
            assert!(
                err.contains("positive duration of at most 24h"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn deploy_dir_defaults_to_current_directory() {
        let cli = Cli::try_parse_from(["miren", "deploy"]).expect("ok");
        let Command::Deploy(args) = cli.command else {
            panic!("not deploy");
        };
        assert_eq!(args.dir, PathBuf::from("."));
    }
}
