//! The `miren` command-line client: argument parsing ([`Cli`]), a synchronous HTTP/1.1
//! client of the agent's API socket ([`Client`]), and text or JSON output.
//!
//! Agent-reported errors (e.g. config diagnostics with file:line:column) are printed
//! verbatim; see [`CliError::report`].

mod args;
mod client;
pub mod doctor;
mod error;
mod http;
mod render;

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use serde::Serialize;

pub use args::{
    AppCommand, AppDirArgs, CertCommand, Cli, Command, DEFAULT_SOCKET, NodeCommand, OutputFormat,
    PortsArgs, PortsCommand, PortsEditArgs, RouteCommand, SOCKET_ENV,
};
pub use client::{Client, DEFAULT_TIMEOUT, LogsRequest};
pub use error::{CliError, HttpError};

use crate::api::types::{
    CertRequest, DeployRequest, LogChunk, PortsEditRequest, RouteImportRequest, RouteRequest,
};
use crate::bundle::{self, BundleHash};
use crate::config::{Source, ValidationContext, parse_deployable};

/// How often `miren ports --watch` redraws.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// How often `miren logs -f` asks for new lines.
const LOGS_POLL: Duration = Duration::from_millis(500);

/// ANSI: cursor home, clear screen.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

/// Runs one `miren` command, printing its result on stdout.
///
/// # Errors
/// Whatever the command hit; print it with [`CliError::report`] and exit with status 1.
/// A closed stdout (e.g. `miren ports | head`) is not an error.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match dispatch(&cli) {
        Err(CliError::Stdout(err)) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        result => result,
    }
}

fn dispatch(cli: &Cli) -> Result<(), CliError> {
    let client = Client::new(cli.socket_path());
    let out = Output(cli.output);
    match &cli.command {
        Command::Deploy(AppDirArgs { dir }) => {
            let (source_name, toml) = read_app_config(dir)?;
            let bundle = upload_bundle(&client, dir)?;
            out.print(
                &client.deploy(&DeployRequest {
                    source_name,
                    toml,
                    bundle: Some(bundle.to_string()),
                })?,
                render::deployed,
            )
        }
        Command::Validate(AppDirArgs { dir }) => validate(dir, out),
        Command::Apps => out.print(&client.apps()?, |apps| render::apps(apps)),
        Command::App(AppCommand::Show { name, show_secrets }) => {
            out.print(&client.app(name, *show_secrets)?, render::app_detail)
        }
        Command::App(AppCommand::Rm { name }) => {
            out.print(&client.remove_app(name)?, render::removed_app)
        }
        Command::Route(RouteCommand::Set {
            host,
            app,
            service,
            timeout,
        })
        | Command::Route(RouteCommand::Add {
            host,
            app,
            service,
            timeout,
        }) => {
            let request = RouteRequest {
                app: app.clone(),
                service: service.clone(),
                timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            };
            out.print(&client.set_route(host, &request)?, render::route_set)
        }
        Command::Route(RouteCommand::Rm { host }) => {
            out.print(&client.remove_route(host)?, render::route_removed)
        }
        Command::Route(RouteCommand::List) => {
            out.print(&client.routes()?, |routes| render::routes(routes))
        }
        Command::Route(RouteCommand::Import { file }) => out.print(
            &client.import_routes(&read_route_file(file)?)?,
            render::routes_imported,
        ),
        Command::Nodes => out.print(&client.nodes()?, |nodes| render::nodes(nodes)),
        Command::Doctor { config } => {
            let checks = doctor::run(config.clone(), &client);
            out.print(&checks, |checks| doctor::render(checks))?;
            let failed = checks
                .iter()
                .filter(|c| c.verdict == doctor::Verdict::Fail)
                .count();
            if failed > 0 {
                return Err(CliError::Unhealthy { failed });
            }
            Ok(())
        }
        Command::Completion { shell } => {
            let mut stdout = io::stdout().lock();
            crate::agent_cli::miren_completion(*shell, &mut stdout);
            stdout.flush().map_err(CliError::Stdout)
        }
        Command::Node(NodeCommand::Show { name }) => {
            out.print(&client.node(name, false)?, render::node_detail)
        }
        Command::Node(NodeCommand::Cordon { name }) => {
            out.print(&client.node_action(name, "cordon")?, render::node_detail)
        }
        Command::Node(NodeCommand::Drain { name }) => {
            out.print(&client.node_action(name, "drain")?, render::node_detail)
        }
        Command::Node(NodeCommand::Uncordon { name }) => {
            out.print(&client.node_action(name, "uncordon")?, render::node_detail)
        }
        Command::Node(NodeCommand::Rm { name }) => {
            out.print(&client.node(name, true)?, render::node_removed)
        }
        Command::Cert(CertCommand::Set { host, cert, key }) => {
            let request = CertRequest {
                cert_pem: read_pem("certificate", cert)?,
                key_pem: read_pem("private key", key)?,
                cert_file: Some(cert.display().to_string()),
                key_file: Some(key.display().to_string()),
            };
            out.print(&client.set_cert(host, &request)?, render::cert_set)
        }
        Command::Cert(CertCommand::List) => {
            out.print(&client.certs()?, |certs| render::certs(certs))
        }
        Command::Ports(PortsArgs {
            command: Some(PortsCommand::Edit(edit)),
            ..
        }) => {
            let request = PortsEditRequest {
                service: edit.service.clone(),
                add: edit.add.clone(),
                remove: edit.remove.clone(),
            };
            let ports = client.edit_ports(&edit.app, &request)?;
            out.print(&ports, |ports| render::node_ports(ports))
        }
        Command::Ports(PortsArgs {
            app,
            watch: true,
            by_node,
            ..
        }) => watch_ports(&client, app.as_deref(), *by_node, out),
        Command::Ports(PortsArgs { app, by_node, .. }) => out
            .print(&client.ports(app.as_deref())?, |ports| {
                ports_table(ports, *by_node)
            }),
        Command::Endpoints {
            app,
            service: Some(service),
        } => {
            let endpoints = client.service_endpoints(app, service)?;
            out.print(&endpoints, |e| render::endpoints(std::slice::from_ref(e)))
        }
        Command::Endpoints { app, service: None } => {
            out.print(&client.endpoints(app)?, |e| render::endpoints(e))
        }
        Command::Logs {
            app,
            service,
            follow,
            tail,
            since,
            timestamps,
        } => {
            let request = LogsRequest {
                service: service.clone(),
                tail: *tail,
                since: since.clone(),
                ..LogsRequest::default()
            };
            print_logs(&client, out, app, request, *follow, *timestamps)
        }
        Command::Status => out.print(&client.status()?, render::status),
    }
}

/// The output format of this run.
#[derive(Debug, Clone, Copy)]
struct Output(OutputFormat);

impl Output {
    /// Prints `value` as pretty JSON or as the text `text` renders.
    fn print<T: Serialize>(
        self,
        value: &T,
        text: impl FnOnce(&T) -> String,
    ) -> Result<(), CliError> {
        write_stdout(&self.format(value, text)?)
    }

    /// `value` as pretty JSON or as the text `text` renders.
    fn format<T: Serialize>(
        self,
        value: &T,
        text: impl FnOnce(&T) -> String,
    ) -> Result<String, CliError> {
        match self.0 {
            OutputFormat::Text => Ok(text(value)),
            OutputFormat::Json => serde_json::to_string_pretty(value)
                .map(|json| json + "\n")
                .map_err(CliError::Encode),
        }
    }
}

fn write_stdout(text: &str) -> Result<(), CliError> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(CliError::Stdout)
}

/// `miren logs`: every selected line, asking page after page until the agent has no more
/// (without `follow`, only lines written before the command started, so it ends while the
/// instances keep writing); with `follow` then new lines every [`LOGS_POLL`] until
/// interrupted. JSON without `follow` is one object holding every line.
fn print_logs(
    client: &Client,
    out: Output,
    app: &str,
    mut request: LogsRequest,
    follow: bool,
    timestamps: bool,
) -> Result<(), CliError> {
    if !follow {
        request.until = Some(crate::sandbox::logs::log_time(std::time::SystemTime::now()));
    }
    let collect = !follow && matches!(out.0, OutputFormat::Json);
    let mut all = LogChunk::default();
    loop {
        let chunk = client.logs(app, &request)?;
        // `tail` and `since` chose where to start; the cursor goes on from there.
        request.after.clone_from(&chunk.cursor);
        request.tail = None;
        request.since = None;
        let more = chunk.more;
        if collect {
            all.lines.extend(chunk.lines);
            all.cursor = chunk.cursor;
        } else {
            out.print(&chunk, |c| render::log_lines(c, timestamps))?;
        }
        if !more {
            if !follow {
                break;
            }
            thread::sleep(LOGS_POLL);
        }
    }
    if collect {
        out.print(&all, |c| render::log_lines(c, timestamps))?;
    }
    Ok(())
}

/// `miren deploy`: packs `dir` into a bundle within the agent's size limit and uploads it
/// unless the agent has it already; its hash. Files a bundle cannot hold (sockets, fifos,
/// devices) are named on stderr.
fn upload_bundle(client: &Client, dir: &Path) -> Result<BundleHash, CliError> {
    let limit = match client.status()?.max_bundle_bytes {
        0 => bundle::DEFAULT_MAX_BUNDLE_BYTES,
        limit => limit,
    };
    let packed = bundle::pack(dir, limit)?;
    if !packed.skipped.is_empty() {
        let skipped: Vec<String> = packed
            .skipped
            .iter()
            .map(|path| path.display().to_string())
            .collect();
        eprintln!(
            "note: left out of the bundle (not a file, directory or symlink): {}",
            skipped.join(", ")
        );
    }
    if client.bundle(&packed.hash)?.is_none() {
        client.upload_bundle(&packed.hash, &packed.tar)?;
    }
    Ok(packed.hash)
}

/// `DIR/.miren/app.toml` → (name to show in diagnostics, text).
fn read_app_config(dir: &Path) -> Result<(String, String), CliError> {
    let path: PathBuf = dir.join(".miren").join("app.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((path.display().to_string(), text)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            Err(CliError::MissingAppConfig { path })
        }
        Err(source) => Err(CliError::ReadAppConfig { path, source }),
    }
}

/// Reads a PEM file for `miren cert set`; `what` names it in errors.
fn read_pem(what: &'static str, path: &Path) -> Result<String, CliError> {
    std::fs::read(path)
        .and_then(|bytes| {
            String::from_utf8(bytes).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not a PEM text file (not UTF-8)",
                )
            })
        })
        .map_err(|source| CliError::ReadPem {
            what,
            path: path.to_owned(),
            source,
        })
}

/// `miren validate`: the same checks as a deploy, without the agent (node-port conflicts
/// with other apps and the agent's own listener ports are checked only at deploy).
/// The request importing the route file at `path`; a file over the size limit is refused
/// before it is read.
fn read_route_file(path: &Path) -> Result<RouteImportRequest, CliError> {
    let unreadable = |source| CliError::ReadRouteFile {
        path: path.to_owned(),
        source,
    };
    let file = path.display().to_string();
    let bytes = std::fs::metadata(path).map_err(unreadable)?.len();
    let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
    if bytes > crate::routes::MAX_IMPORT_BYTES {
        return Err(crate::routes::ImportError::TooLarge { file, bytes }.into());
    }
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    Ok(RouteImportRequest { file, text })
}

fn validate(dir: &Path, out: Output) -> Result<(), CliError> {
    let (name, text) = read_app_config(dir)?;
    let app = parse_deployable(Source::new(name, text), &ValidationContext::default())?;
    let text = match out.0 {
        OutputFormat::Text => render::validated(&app),
        OutputFormat::Json => out.format(&render::validated_json(&app), |_| String::new())?,
    };
    write_stdout(&text)
}

/// `miren ports --watch`: redraws every [`WATCH_INTERVAL`] until interrupted. A failure of
/// the first fetch ends the command; later ones are shown and retried (e.g. while the agent
/// restarts).
/// The `miren ports` table, with each node's counts after it when `by_node`.
fn ports_table(ports: &[crate::api::types::NodePortInfo], by_node: bool) -> String {
    if by_node {
        render::node_ports_by_node(ports)
    } else {
        render::node_ports(ports)
    }
}

fn watch_ports(
    client: &Client,
    app: Option<&str>,
    by_node: bool,
    out: Output,
) -> Result<(), CliError> {
    let mut first = true;
    loop {
        let frame = match client.ports(app) {
            Ok(ports) => out.format(&ports, |ports| ports_table(ports, by_node))?,
            Err(err) if first => return Err(err),
            Err(err) => match out.0 {
                OutputFormat::Text => err.report() + "\n",
                OutputFormat::Json => {
                    eprintln!("{}", err.report());
                    String::new()
                }
            },
        };
        first = false;
        let frame = match out.0 {
            OutputFormat::Text => format!(
                "{CLEAR_SCREEN}every {}s: miren ports{}  (Ctrl-C to stop)\n\n{frame}",
                WATCH_INTERVAL.as_secs(),
                app.map(|a| format!(" --app {a}")).unwrap_or_default()
            ),
            OutputFormat::Json => frame,
        };
        write_stdout(&frame)?;
        thread::sleep(WATCH_INTERVAL);
    }
}
