//! Rule-by-rule tests: each asserts exact messages and positions.

use std::collections::HashSet;
use std::time::Duration;

use super::*;

fn ctx() -> ValidationContext {
    ValidationContext {
        reserved_ports: vec![(9464, "the agent's metrics listener".to_owned())],
        ..ValidationContext::default()
    }
}

fn parse(text: &str) -> Result<AppConfig, ConfigError> {
    parse_app_config(Source::new("app/.miren/app.toml", text), &ctx())
}

fn ok(text: &str) -> AppConfig {
    parse(text).unwrap_or_else(|e| panic!("expected valid config, got:\n{e}"))
}

/// `"line:column message"` for each diagnostic, in reported order.
fn errs(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => render_short(&e.diagnostics),
    }
}

fn render_short(diags: &[Diagnostic]) -> Vec<String> {
    diags
        .iter()
        .map(|d| format!("{}:{} {}", d.line, d.column, d.message))
        .collect()
}

fn helps(text: &str) -> Vec<String> {
    parse(text)
        .err()
        .map(|e| e.diagnostics.into_iter().map(|d| d.help).collect())
        .unwrap_or_default()
}

const APP: &str = "name = \"demo\"\n";

fn with_app(rest: &str) -> String {
    format!("{APP}{rest}")
}

// ---------------------------------------------------------------- overall

#[test]
fn parses_product_examples() {
    let app = ok(r#"
name = "services"

[[env]]
key = "LOG_LEVEL"
value = "info"

[services.irc]
command = "./ircd"
[[services.irc.ports]]
name = "irc"
port = 6667
type = "tcp"
node_port = 6667
[[services.irc.ports]]
name = "ircs"
port = 6697
type = "tcp"
node_port = 6697

[services.dns]
command = "./dns"
ports = [
  { name = "dns-udp", port = 53, type = "udp", node_port = 53 },
  { name = "dns-tcp", port = 53, type = "tcp", node_port = 53 },
]

[services.game]
command = "./game"
concurrency = { mode = "fixed", num_instances = 2, shutdown_timeout = "30s" }
[[services.game.ports]]
name = "admin"
port = 8080
[[services.game.ports]]
name = "game"
port = 27015
type = "udp"
node_port = 27015

[services.echo]
command = "./echo"
[[services.echo.ports]]
name = "echo"
port = 7000
type = "tcp"
node_port = 7000

[services.web]
command = "./web"
port = 3000
"#);
    assert_eq!(app.name, "services");
    assert_eq!(
        app.env,
        [EnvVar {
            key: "LOG_LEVEL".into(),
            value: "info".into()
        }]
    );
    let names: Vec<_> = app.services.keys().map(String::as_str).collect();
    assert_eq!(names, ["dns", "echo", "game", "irc", "web"]);
    let game = &app.services["game"];
    assert_eq!(game.command.as_deref(), Some("./game"));
    assert_eq!(
        game.concurrency,
        Concurrency {
            mode: ConcurrencyMode::Fixed { num_instances: 2 },
            shutdown_timeout: Duration::from_secs(30),
        }
    );
    let ports: Vec<_> = game
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.port, p.kind, p.node_port))
        .collect();
    assert_eq!(
        ports,
        [
            ("admin", Some(8080), PortKind::Http, None),
            ("game", Some(27015), PortKind::Udp, Some(27015)),
        ]
    );
    let dns: Vec<_> = app.services["dns"]
        .ports
        .iter()
        .map(|p| p.kind.protocol())
        .collect();
    assert_eq!(dns, [Protocol::Udp, Protocol::Tcp]);
    let web = &app.services["web"];
    assert_eq!(web.ports.len(), 1);
    assert_eq!(
        (
            web.ports[0].name.as_str(),
            web.ports[0].port,
            web.ports[0].kind
        ),
        ("http", Some(3000), PortKind::Http)
    );
    assert_eq!(check_deployable(&app), Ok(()));
}

#[test]
fn renders_all_errors_in_file_order() {
    let text = "name = \"demo\"\n\n[services.game]\ncommand = \"./game\"\n[[services.game.ports]]\nname = \"admin\"\nport = 8080\nnode_port = 80\n\n[services.api]\ncomand = \"./api\"\n";
    let err = parse(text).err().map(|e| e.to_string());
    let want = "\
error: node_port is not allowed on an http port
 --> app/.miren/app.toml:8:13
  |
8 | node_port = 80
  |             ^^
  = help: http ports are reached through routes (`miren route set HOST APP`); set type = \"tcp\" or \"udp\" to publish a raw port

error: node_port 80 is reserved for the HTTP ingress
 --> app/.miren/app.toml:8:13
  |
8 | node_port = 80
  |             ^^
  = help: choose another node_port

error: unknown key `comand` in [services.api]
  --> app/.miren/app.toml:11:1
   |
11 | comand = \"./api\"
   | ^^^^^^
   = help: did you mean `command`?";
    assert_eq!(err.as_deref(), Some(want));
}

#[test]
fn toml_syntax_error_is_located() {
    assert_eq!(
        errs("name = \"demo\"\n[services.web\ncommand = \"x\"\n"),
        ["2:14 unclosed table, expected `]`"]
    );
}

#[test]
fn wrong_table_shape_is_located() {
    assert_eq!(
        errs("name = \"demo\"\nservices = 5\n"),
        ["2:12 invalid type: integer `5`, expected a map"]
    );
}

// ---------------------------------------------------------------- keys

#[test]
fn unknown_keys_everywhere_with_hints() {
    let text = with_app(
        r#"nmae = "x"
[[env]]
key = "A"
vaule = "b"
[services.web]
comand = "./web"
node_port = 7000
bogus = 1
concurrency = { mode = "auto", requests_per_instanse = 3 }
[[services.web.ports]]
name = "http"
prot = 80
"#,
    );
    assert_eq!(
        errs(&text),
        [
            "2:1 unknown key `nmae` at the top level",
            "3:1 env entry has no `value`",
            "5:1 unknown key `vaule` in [[env]]",
            "7:1 unknown key `comand` in [services.web]",
            "8:1 unknown key `node_port` in [services.web]",
            "9:1 unknown key `bogus` in [services.web]",
            "10:32 unknown key `requests_per_instanse` in [services.web.concurrency]",
            "13:1 unknown key `prot` in [[services.web.ports]]",
        ]
    );
    assert_eq!(
        helps(&text),
        [
            "did you mean `name`?",
            "add value = \"...\" to this entry",
            "did you mean `value`?",
            "did you mean `command`?",
            "`node_port` belongs in a [[services.NAME.ports]] entry",
            "remove it; the keys allowed here are: command, image, env, concurrency, port, port_name, port_type, ports",
            "did you mean `requests_per_instance`?",
            "did you mean `port`?",
        ]
    );
}

#[test]
fn known_keys_accepted() {
    ok(&with_app(
        r#"[[env]]
key = "A"
value = "b"
[services.web]
command = "./web"
env = [{ key = "B", value = "c" }]
concurrency = { mode = "auto", requests_per_instance = 3, scale_down_delay = "1m", shutdown_timeout = "5s" }
[[services.web.ports]]
name = "http"
port = 80
type = "http"
"#,
    ));
}

// ---------------------------------------------------------------- names

#[test]
fn app_name_rules() {
    assert_eq!(ok("name = \"my-app-2\"\n").name, "my-app-2");
    assert_eq!(
        errs("[services.web]\ncommand = \"x\"\n"),
        ["1:1 missing app `name`"]
    );
    assert_eq!(
        helps("[services.web]\ncommand = \"x\"\n"),
        ["add name = \"my-app\" at the top of the file"]
    );
    assert_eq!(
        errs("name = \"My_App\"\n"),
        ["1:8 invalid app name \"My_App\""]
    );
    assert_eq!(
        helps("name = \"-x\"\n"),
        [
            "use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit, e.g. \"my-app\""
        ]
    );
    assert_eq!(
        errs("name = 5\n"),
        ["1:8 `name` must be a string, found integer"]
    );
    assert_eq!(helps("name = 5\n"), ["write it like name = \"my-app\""]);
}

#[test]
fn service_name_rules() {
    ok(&with_app("[services.api-v2]\ncommand = \"x\"\n"));
    assert_eq!(
        errs(&with_app("[services.Web]\ncommand = \"x\"\n")),
        ["2:11 invalid service name \"Web\""]
    );
}

// ---------------------------------------------------------------- rule 1

#[test]
fn rule1_simple_port_fields_alone_are_fine() {
    let app = ok(&with_app(
        "[services.dns]\ncommand = \"x\"\nport = 53\nport_name = \"dns\"\nport_type = \"udp\"\n",
    ));
    let p = &app.services["dns"].ports[0];
    assert_eq!(
        (p.name.as_str(), p.port, p.kind),
        ("dns", Some(53), PortKind::Udp)
    );
    let app = ok(&with_app(
        "[services.w]\ncommand = \"x\"\nport_type = \"tcp\"\n",
    ));
    let p = &app.services["w"].ports[0];
    assert_eq!(
        (p.name.as_str(), p.port, p.kind),
        ("tcp", None, PortKind::Tcp)
    );
}

#[test]
fn rule1_ports_array_with_simple_fields_is_an_error() {
    let text = with_app(
        "[services.web]\ncommand = \"x\"\nport = 80\nport_type = \"http\"\n[[services.web.ports]]\nname = \"http\"\nport = 8080\n",
    );
    assert_eq!(
        errs(&text),
        [
            "4:8 `port` cannot be combined with [[services.web.ports]]",
            "5:13 `port_type` cannot be combined with [[services.web.ports]]",
        ]
    );
    assert_eq!(
        helps(&text)[0],
        "move it into a [[services.web.ports]] entry, or remove the ports array"
    );
    assert_eq!(
        errs(&with_app(
            "[services.web]\ncommand = \"x\"\nport_name = \"a\"\nports = [{ name = \"b\" }]\n"
        )),
        ["4:13 `port_name` cannot be combined with [[services.web.ports]]"]
    );
}

// ---------------------------------------------------------------- rule 2

const PORTS: &str = "[services.s]\ncommand = \"x\"\n";

#[test]
fn rule2_valid_ports() {
    let app = ok(&with_app(&format!(
        "{PORTS}[[services.s.ports]]\nname = \"a\"\nport = 1\n[[services.s.ports]]\nname = \"b\"\nport = 65535\ntype = \"tcp\"\n[[services.s.ports]]\nname = \"c\"\ntype = \"udp\"\n"
    )));
    let kinds: Vec<_> = app.services["s"]
        .ports
        .iter()
        .map(|p| (p.port, p.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            (Some(1), PortKind::Http),
            (Some(65535), PortKind::Tcp),
            (None, PortKind::Udp)
        ]
    );
}

#[test]
fn rule2_port_range() {
    let text = with_app(&format!(
        "{PORTS}ports = [\n  {{ name = \"a\", port = 0 }},\n  {{ name = \"b\", port = 65536 }},\n  {{ name = \"c\", port = \"80\" }},\n]\n"
    ));
    assert_eq!(
        errs(&text),
        [
            "5:24 port 0 is out of range",
            "6:24 port 65536 is out of range",
            "7:24 `port` must be an integer, found string",
        ]
    );
    assert_eq!(
        helps(&text)[..2],
        [
            "use a port from 1 to 65535, or leave `port` out to have one assigned",
            "use a port from 1 to 65535, or leave `port` out to have one assigned",
        ]
    );
    assert_eq!(
        errs(&with_app("[services.s]\nport = -1\n")),
        ["3:8 port -1 is out of range"]
    );
}

#[test]
fn rule2_port_name_required_and_unique() {
    let text = with_app(&format!(
        "{PORTS}[[services.s.ports]]\nport = 80\n[[services.s.ports]]\nname = \"a\"\nport = 81\n[[services.s.ports]]\nname = \"a\"\nport = 82\n[[services.s.ports]]\nname = \"\"\nport = 83\n"
    ));
    assert_eq!(
        errs(&text),
        [
            "4:1 port entry has no `name`",
            "10:8 duplicate port name \"a\" in service \"s\"",
            "13:8 `name` must not be empty",
        ]
    );
    assert_eq!(
        helps(&text),
        [
            "add name = \"...\" to this entry, e.g. name = \"game\"; names are unique within a service",
            "the first one is on line 7; give each port a unique name",
            "give the port a short name, e.g. \"http\" or \"game\"",
        ]
    );
}

#[test]
fn rule2_port_type() {
    let text = with_app(&format!(
        "{PORTS}ports = [\n  {{ name = \"a\", type = \"htp\" }},\n  {{ name = \"b\", type = \"quic\", node_port = 443 }},\n]\n"
    ));
    assert_eq!(
        errs(&text),
        [
            "5:24 unknown port type \"htp\"",
            "6:24 unknown port type \"quic\"",
            "6:44 node_port 443 is reserved for the HTTPS ingress",
        ]
    );
    assert_eq!(
        helps(&text),
        [
            "did you mean \"http\"? port types are http, tcp and udp",
            "use one of http, tcp or udp",
            "choose another node_port",
        ]
    );
    assert_eq!(
        errs(&with_app("[services.s]\nport_type = \"UDP\"\n")),
        ["3:13 unknown port type \"UDP\""]
    );
}

// ---------------------------------------------------------------- rule 3

#[test]
fn rule3_tcp_and_udp_may_share_a_number() {
    ok(&with_app(&format!(
        "{PORTS}ports = [\n  {{ name = \"a\", port = 53, type = \"tcp\" }},\n  {{ name = \"b\", port = 53, type = \"udp\" }},\n]\n"
    )));
}

#[test]
fn rule3_http_and_tcp_on_one_number_collide() {
    let text = with_app(&format!(
        "{PORTS}ports = [\n  {{ name = \"a\", port = 8080 }},\n  {{ name = \"b\", port = 8080, type = \"tcp\" }},\n  {{ name = \"c\", port = 53, type = \"udp\" }},\n  {{ name = \"d\", port = 53, type = \"udp\" }},\n]\n"
    ));
    assert_eq!(
        errs(&text),
        [
            "6:24 port 8080/tcp is declared twice in service \"s\"",
            "8:24 port 53/udp is declared twice in service \"s\"",
        ]
    );
    assert_eq!(
        helps(&text)[0],
        "the first one is on line 5 (http and tcp ports both use tcp); use a different port number"
    );
}

// ---------------------------------------------------------------- rule 4

fn node_port_entry(kind: &str, node_port: &str) -> String {
    with_app(&format!(
        "{PORTS}[[services.s.ports]]\nname = \"p\"\nport = 9000\ntype = \"{kind}\"\nnode_port = {node_port}\n"
    ))
}

#[test]
fn rule4_valid_node_ports() {
    for (kind, n) in [("tcp", 1), ("udp", 65535), ("tcp", 8080), ("udp", 53)] {
        let app = ok(&node_port_entry(kind, &n.to_string()));
        assert_eq!(app.services["s"].ports[0].node_port, Some(n));
    }
}

#[test]
fn rule4_node_port_errors_each_have_their_own_message() {
    let cases = [
        (
            "tcp",
            "0",
            "node_port 0 is out of range",
            "use a node_port from 1 to 65535",
        ),
        (
            "udp",
            "65536",
            "node_port 65536 is out of range",
            "use a node_port from 1 to 65535",
        ),
        (
            "tcp",
            "80",
            "node_port 80 is reserved for the HTTP ingress",
            "choose another node_port",
        ),
        (
            "udp",
            "443",
            "node_port 443 is reserved for the HTTPS ingress",
            "choose another node_port",
        ),
        (
            "tcp",
            "8443",
            "node_port 8443 is reserved for the Miren API",
            "choose another node_port",
        ),
        (
            "tcp",
            "9464",
            "node_port 9464 is used by the agent's metrics listener",
            "choose another node_port",
        ),
        (
            "http",
            "7000",
            "node_port is not allowed on an http port",
            "http ports are reached through routes (`miren route set HOST APP`); set type = \"tcp\" or \"udp\" to publish a raw port",
        ),
        (
            "tcp",
            "\"7000\"",
            "`node_port` must be an integer, found string",
            "write it like node_port = 27015",
        ),
    ];
    for (kind, n, message, help) in cases {
        let text = node_port_entry(kind, n);
        assert_eq!(errs(&text), [format!("8:13 {message}")], "{kind} {n}");
        assert_eq!(helps(&text), [help], "{kind} {n}");
    }
}

// ---------------------------------------------------------------- rule 5

const TWO_SERVICES: &str = "[services.a]\ncommand = \"x\"\n[[services.a.ports]]\nname = \"p\"\ntype = \"udp\"\nnode_port = 7000\n[services.b]\ncommand = \"x\"\n[[services.b.ports]]\nname = \"q\"\ntype = \"PROTO\"\nnode_port = 7000\n";

#[test]
fn rule5_node_port_unique_within_app() {
    ok(&with_app(&TWO_SERVICES.replace("PROTO", "tcp")));
    let text = with_app(&TWO_SERVICES.replace("PROTO", "udp"));
    assert_eq!(
        errs(&text),
        ["13:13 node_port 7000/udp is published twice in this app"]
    );
    assert_eq!(
        helps(&text),
        ["service \"a\" port \"p\" already publishes it on line 7; choose another node_port"]
    );
}

#[test]
fn rule5_node_port_unique_across_apps() {
    let app = ok(&with_app(&TWO_SERVICES.replace("PROTO", "tcp")));
    let claim = |node_port, protocol, app: &str| NodePortClaim {
        node_port,
        protocol,
        app: app.to_owned(),
        service: "main".to_owned(),
    };
    let fine = [
        claim(7000, Protocol::Udp, "demo"),
        claim(7001, Protocol::Udp, "other"),
    ];
    assert_eq!(check_node_port_claims(&app, fine), []);
    let diags = check_node_port_claims(
        &app,
        [
            claim(7000, Protocol::Tcp, "echo"),
            claim(7000, Protocol::Udp, "dns"),
        ],
    );
    assert_eq!(
        render_short(&diags),
        [
            "7:13 node_port 7000/udp is already taken by app \"dns\" service \"main\"",
            "13:13 node_port 7000/tcp is already taken by app \"echo\" service \"main\"",
        ]
    );
    assert_eq!(
        diags[1].help,
        "choose another node_port, or first remove it from app \"echo\" (`miren ports edit echo --service main --rm-published 7000/tcp`)"
    );
}

// ---------------------------------------------------------------- rule 6

fn concurrency_of(service: &str, table: &str) -> Result<Concurrency, Vec<String>> {
    let text = with_app(&format!(
        "[services.{service}]\ncommand = \"x\"\nconcurrency = {{ {table} }}\n"
    ));
    match parse(&text) {
        Ok(app) => Ok(app.services[service].concurrency.clone()),
        Err(e) => Err(e
            .diagnostics
            .iter()
            .map(|d| format!("{} | {}", d.message, d.help))
            .collect()),
    }
}

#[test]
fn rule6_defaults() {
    let app = ok(&with_app(
        "[services.web]\ncommand = \"x\"\n[services.worker]\ncommand = \"y\"\n",
    ));
    assert_eq!(
        app.services["web"].concurrency,
        Concurrency {
            mode: ConcurrencyMode::Auto {
                requests_per_instance: 10,
                scale_down_delay: Duration::from_secs(900),
            },
            shutdown_timeout: Duration::from_secs(10),
        }
    );
    assert_eq!(
        app.services["worker"].concurrency,
        Concurrency {
            mode: ConcurrencyMode::Fixed { num_instances: 1 },
            shutdown_timeout: Duration::from_secs(10),
        }
    );
    assert_eq!(
        concurrency_of("worker", "shutdown_timeout = \"1m\""),
        Ok(Concurrency {
            mode: ConcurrencyMode::Fixed { num_instances: 1 },
            shutdown_timeout: Duration::from_secs(60),
        })
    );
}

#[test]
fn rule6_valid_modes() {
    assert_eq!(
        concurrency_of("web", "mode = \"fixed\", num_instances = 3"),
        Ok(Concurrency {
            mode: ConcurrencyMode::Fixed { num_instances: 3 },
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        })
    );
    assert_eq!(
        concurrency_of(
            "worker",
            "mode = \"auto\", requests_per_instance = 50, scale_down_delay = \"1h30m\", shutdown_timeout = \"500ms\""
        ),
        Ok(Concurrency {
            mode: ConcurrencyMode::Auto {
                requests_per_instance: 50,
                scale_down_delay: Duration::from_secs(5400),
            },
            shutdown_timeout: Duration::from_millis(500),
        })
    );
}

#[test]
fn rule6_fixed_rules() {
    assert_eq!(
        concurrency_of("worker", "mode = \"fixed\", num_instances = 0"),
        Err(vec![
            "num_instances must be at least 1, found 0 | set num_instances to 1 or more".to_owned()
        ])
    );
    assert_eq!(
        concurrency_of("worker", "num_instances = 4294967296"),
        Err(vec![
            "num_instances 4294967296 is too large | set num_instances to at most 4294967295"
                .to_owned()
        ])
    );
    assert_eq!(
        concurrency_of(
            "worker",
            "mode = \"fixed\", requests_per_instance = 5, scale_down_delay = \"1m\""
        ),
        Err(vec![
            "`requests_per_instance` cannot be used with mode = \"fixed\" | it only applies to mode = \"auto\"; remove it, or set mode = \"auto\"".to_owned(),
            "`scale_down_delay` cannot be used with mode = \"fixed\" | it only applies to mode = \"auto\"; remove it, or set mode = \"auto\"".to_owned(),
        ])
    );
    assert_eq!(
        concurrency_of("worker", "requests_per_instance = 5"),
        Err(vec![
            "`requests_per_instance` cannot be used with mode = \"fixed\" (the default for service \"worker\") | it only applies to mode = \"auto\"; remove it, or set mode = \"auto\"".to_owned(),
        ])
    );
}

#[test]
fn rule6_auto_rules() {
    assert_eq!(
        concurrency_of("worker", "mode = \"auto\", num_instances = 2"),
        Err(vec!["`num_instances` cannot be used with mode = \"auto\" | it only applies to mode = \"fixed\"; remove it, or set mode = \"fixed\"".to_owned()])
    );
    assert_eq!(
        concurrency_of("web", "num_instances = 2"),
        Err(vec!["`num_instances` cannot be used with mode = \"auto\" (the default for service \"web\") | it only applies to mode = \"fixed\"; remove it, or set mode = \"fixed\"".to_owned()])
    );
    assert_eq!(
        concurrency_of("web", "requests_per_instance = 0"),
        Err(vec!["requests_per_instance must be at least 1, found 0 | set requests_per_instance to 1 or more".to_owned()])
    );
}

#[test]
fn rule6_mode_and_durations() {
    assert_eq!(
        concurrency_of("web", "mode = \"fxied\""),
        Err(vec!["unknown concurrency mode \"fxied\" | did you mean \"fixed\"? the modes are \"fixed\" and \"auto\"".to_owned()])
    );
    assert_eq!(
        concurrency_of("web", "mode = \"manual\""),
        Err(vec![
            "unknown concurrency mode \"manual\" | use \"fixed\" or \"auto\"".to_owned()
        ])
    );
    let help = "write whole numbers with units h, m, s or ms, e.g. \"15m\", \"10s\", \"1h30m\" or \"500ms\"";
    assert_eq!(
        concurrency_of(
            "web",
            "scale_down_delay = \"15\", shutdown_timeout = \"1.5s\""
        ),
        Err(vec![
            format!("invalid duration \"15\" for `scale_down_delay` | {help}"),
            format!("invalid duration \"1.5s\" for `shutdown_timeout` | {help}"),
        ])
    );
    assert_eq!(
        concurrency_of("web", "shutdown_timeout = 10"),
        Err(vec!["`shutdown_timeout` must be a string, found integer | write it like shutdown_timeout = \"15m\"".to_owned()])
    );
}

// ---------------------------------------------------------------- rule 7

#[test]
fn rule7_port_env_is_reserved() {
    let text = with_app(
        "[[env]]\nkey = \"PORT\"\nvalue = \"1\"\n[services.web]\ncommand = \"x\"\nenv = [{ key = \"PORT_2\", value = \"1\" }, { key = \"2X\", value = \"1\" }]\n[services.w2]\ncommand = \"x\"\n[services.w2.env]\nPORT = \"1\"\nPORT_X = \"ok\"\n",
    );
    assert_eq!(
        errs(&text),
        [
            "3:7 `PORT` cannot be set in env",
            "7:16 `PORT_2` cannot be set in env",
            "7:49 invalid env key \"2X\"",
            "11:1 `PORT` cannot be set in env",
        ]
    );
    assert_eq!(
        helps(&text)[..3],
        [
            "the agent sets PORT to the service's first http port (else its first port); remove this entry",
            "the agent sets PORT_1..PORT_N to a multi-port service's ports in declaration order; remove this entry",
            "use letters, digits and '_', not starting with a digit, e.g. \"DATABASE_URL\"",
        ]
    );
}

#[test]
fn rule7_env_entries_and_table_form() {
    let app = ok(&with_app(
        "[[env]]\nkey = \"A\"\nvalue = \"1\"\n[[env]]\nkey = \"N\"\nvalue = 5\n[services.web]\ncommand = \"x\"\n[services.web.env]\nPORT_X = \"ok\"\nDEBUG = true\n",
    ));
    let app_env: Vec<_> = app
        .env
        .iter()
        .map(|v| (v.key.as_str(), v.value.as_str()))
        .collect();
    assert_eq!(app_env, [("A", "1"), ("N", "5")]);
    let web_env: Vec<_> = app.services["web"]
        .env
        .iter()
        .map(|v| (v.key.as_str(), v.value.as_str()))
        .collect();
    assert_eq!(web_env, [("DEBUG", "true"), ("PORT_X", "ok")]);
    assert_eq!(
        errs(&with_app(
            "[[env]]\nvalue = \"1\"\n[[env]]\nkey = \"A\"\nvalue = [1]\n"
        )),
        [
            "2:1 env entry has no `key`",
            "6:9 `value` must be a string, found array",
        ]
    );
    assert_eq!(
        errs(&with_app("[[env]]\nkey = \"A\"\n")),
        ["2:1 env entry has no `value`"]
    );
}

fn env_of(app: &AppConfig, service: &str) -> Vec<(String, String)> {
    let env = instance_env(app, &app.services[service]).unwrap_or_else(|e| panic!("{e}"));
    env.into_iter().collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn rule7_port_variables() {
    let app = ok(&with_app(
        "[[env]]\nkey = \"A\"\nvalue = \"app\"\n[[env]]\nkey = \"B\"\nvalue = \"app\"\n\
         [services.game]\ncommand = \"x\"\nenv = [{ key = \"B\", value = \"svc\" }]\n\
         ports = [{ name = \"game\", port = 27015, type = \"udp\" }, { name = \"admin\", port = 8080 }, { name = \"rcon\", port = 27016, type = \"tcp\" }]\n\
         [services.dns]\ncommand = \"x\"\nports = [{ name = \"u\", port = 53, type = \"udp\" }, { name = \"t\", port = 54, type = \"tcp\" }]\n\
         [services.web]\ncommand = \"x\"\nport = 3000\n\
         [services.worker]\ncommand = \"x\"\n",
    ));
    assert_eq!(
        env_of(&app, "game"),
        pairs(&[
            ("A", "app"),
            ("B", "svc"),
            ("PORT", "8080"),
            ("PORT_1", "27015"),
            ("PORT_2", "8080"),
            ("PORT_3", "27016"),
        ])
    );
    assert_eq!(
        env_of(&app, "dns"),
        pairs(&[
            ("A", "app"),
            ("B", "app"),
            ("PORT", "53"),
            ("PORT_1", "53"),
            ("PORT_2", "54"),
        ])
    );
    assert_eq!(
        env_of(&app, "web"),
        pairs(&[("A", "app"), ("B", "app"), ("PORT", "3000")])
    );
    assert_eq!(env_of(&app, "worker"), pairs(&[("A", "app"), ("B", "app")]));
}

#[test]
fn rule7_assign_missing_ports() {
    let mut app = ok(&with_app(
        "[services.a]\ncommand = \"x\"\nports = [{ name = \"p\" }, { name = \"q\", port = 20001 }, { name = \"r\" }, { name = \"u\", type = \"udp\" }]\n\
         [services.b]\ncommand = \"x\"\nports = [{ name = \"p\" }]\n",
    ));
    assert_eq!(
        instance_env(&app, &app.services["a"]).map_err(|e| e.to_string()),
        Err("port \"p\" of service \"a\" has no port number; assign ports first".to_owned())
    );
    let taken = HashSet::from([(20000, Protocol::Tcp)]);
    assert_eq!(assign_ports(&mut app, 20000..=20010, &taken), Ok(()));
    let numbers = |s: &str| -> Vec<_> { app.services[s].ports.iter().map(|p| p.port).collect() };
    assert_eq!(
        numbers("a"),
        [Some(20002), Some(20001), Some(20003), Some(20000)]
    );
    assert_eq!(numbers("b"), [Some(20001)]);
    assert_eq!(
        env_of(&app, "a"),
        pairs(&[
            ("PORT", "20002"),
            ("PORT_1", "20002"),
            ("PORT_2", "20001"),
            ("PORT_3", "20003"),
            ("PORT_4", "20000"),
        ])
    );
}

#[test]
fn rule7_assign_fails_when_range_is_full() {
    let mut app = ok(&with_app(
        "[services.a]\ncommand = \"x\"\n[[services.a.ports]]\nname = \"p\"\nport = 30000\n[[services.a.ports]]\nname = \"q\"\n",
    ));
    let before = app.clone();
    let err = assign_ports(&mut app, 30000..=30000, &HashSet::new()).err();
    assert_eq!(
        err.map(|e| render_short(&e.diagnostics)),
        Some(vec![
            "7:1 no free tcp port left in 30000-30000 for port \"q\" of service \"a\"".to_owned()
        ])
    );
    assert_eq!(app, before);
}

// ---------------------------------------------------------------- rule 8

#[test]
fn rule8_image_parses_but_is_not_deployable() {
    let app = ok(&with_app(
        "[services.web]\nimage = \"nginx:latest\"\n[services.worker]\nport = 9000\n",
    ));
    assert_eq!(app.services["web"].image.as_deref(), Some("nginx:latest"));
    let err = check_deployable(&app).err();
    assert_eq!(
        err.map(|e| render_short(&e.diagnostics)),
        Some(vec![
            "3:9 container images are not supported by this node runtime; use `command`".to_owned(),
            "4:1 service \"worker\" has no `command`".to_owned(),
        ])
    );
    assert_eq!(
        IMAGE_UNSUPPORTED,
        "container images are not supported by this node runtime; use `command`"
    );
}

#[test]
fn rule8_command_is_deployable() {
    let app = ok(&with_app("[services.web]\ncommand = \"./web\"\n"));
    assert_eq!(check_deployable(&app), Ok(()));
    assert_eq!(
        errs(&with_app("[services.web]\ncommand = [\"./web\"]\n")),
        ["3:11 `command` must be a string, found array"]
    );
}

// ---------------------------------------------------------------- limits

fn with_limits(limits: Limits) -> ValidationContext {
    ValidationContext { limits, ..ctx() }
}

fn limited(text: &str, limits: Limits) -> Vec<String> {
    match parse_app_config(
        Source::new("app/.miren/app.toml", text),
        &with_limits(limits),
    ) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e
            .diagnostics
            .iter()
            .map(|d| format!("{}:{} {} | {}", d.line, d.column, d.message, d.help))
            .collect(),
    }
}

#[test]
fn limits_default_to_the_documented_values() {
    let limits = ValidationContext::default().limits;
    assert_eq!(limits.services_per_app, 64);
    assert_eq!(limits.ports_per_service, 32);
    assert_eq!(limits.instances_per_service, 64);
    assert_eq!(limits.instances_per_node, 1024);
}

#[test]
fn services_over_the_limit_are_one_diagnostic_and_not_checked() {
    let limits = Limits {
        services_per_app: 2,
        ..Limits::default()
    };
    // The services past the limit (in file order, not by name) have errors of their own
    // that are not reported.
    let text = with_app(
        "[services.b]\ncommand = \"x\"\n[services.a]\ncommand = \"x\"\n[services.c]\nbogus = 1\n[services.-bad]\nport = 0\n",
    );
    assert_eq!(
        limited(&text, limits),
        [
            "6:11 the app has 4 services, more than the limit of 2 per app (nothing else was checked) | split it into several apps, or raise the agent's limit with --max-services-per-app (`max-services-per-app` in agent.toml); `miren validate` checks the default limits"
        ]
    );
    // At the limit: valid.
    let two = with_app("[services.b]\ncommand = \"x\"\n[services.a]\ncommand = \"x\"\n");
    let app = parse_app_config(Source::new("f", two), &with_limits(limits)).unwrap();
    assert_eq!(app.services.len(), 2);
}

#[test]
fn ten_thousand_services_give_one_diagnostic_under_the_default_limit() {
    let mut text = APP.to_owned();
    for i in 0..10_000 {
        text.push_str(&format!(
            "[services.s{i}]\ncommand = \"sleep 1000\"\nunknown = {i}\n"
        ));
    }
    let err = parse_app_config(Source::new("f", text), &ValidationContext::default())
        .expect_err("over the limit");
    let short = render_short(&err.diagnostics);
    // Only the limit: the unknown keys of the services are not reported.
    assert_eq!(
        short,
        [
            "194:11 the app has 10000 services, more than the limit of 64 per app (nothing else was checked)"
        ]
    );
}

#[test]
fn ports_over_the_limit_are_one_diagnostic_and_not_checked() {
    let limits = Limits {
        ports_per_service: 2,
        ..Limits::default()
    };
    let text = with_app(
        "[services.game]\ncommand = \"x\"\nports = [\n  { name = \"a\", port = 1, type = \"udp\" },\n  { name = \"b\", port = 2, type = \"udp\" },\n  { name = \"a\", port = 0, type = \"bogus\" },\n]\n",
    );
    assert_eq!(
        limited(&text, limits),
        [
            "7:3 service \"game\" has 3 ports, more than the limit of 2 per service (nothing else was checked) | declare fewer ports, or split the service, or raise the agent's limit with --max-ports-per-service (`max-ports-per-service` in agent.toml); `miren validate` checks the default limits"
        ]
    );
}

#[test]
fn fixed_instances_over_the_per_service_limit() {
    assert_eq!(
        concurrency_of("worker", "num_instances = 64"),
        Ok(Concurrency {
            mode: ConcurrencyMode::Fixed { num_instances: 64 },
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        })
    );
    assert_eq!(
        concurrency_of("worker", "num_instances = 65"),
        Err(vec![
            "num_instances 65 is more than the limit of 64 instances per service | lower num_instances, or raise the agent's limit with --max-instances-per-service (`max-instances-per-service` in agent.toml); `miren validate` checks the default limits".to_owned()
        ])
    );
}

#[test]
fn node_instance_limit_points_at_the_service_that_crosses_it() {
    let app = ok(&with_app(
        "[services.web]\ncommand = \"x\"\n[services.b]\ncommand = \"x\"\nconcurrency = { num_instances = 3 }\n[services.a]\ncommand = \"x\"\n",
    ));
    // web is auto (0), b has 3, a the default 1.
    assert_eq!(app.fixed_instances(), 4);
    assert_eq!(check_node_instances(&app, 6, 10), None);
    let at = |others| {
        check_node_instances(&app, others, 10)
            .map(|d| format!("{}:{} {}", d.line, d.column, d.message))
    };
    assert_eq!(
        at(8).as_deref(),
        Some(
            "6:33 this deploy would run 12 fixed instances on the node (8 of other apps), more than the limit of 10 per node; service \"b\" crosses it"
        )
    );
    // b fits, a (no concurrency table: its service table is pointed at) crosses.
    assert_eq!(
        at(7).as_deref(),
        Some(
            "7:1 this deploy would run 11 fixed instances on the node (7 of other apps), more than the limit of 10 per node; service \"a\" crosses it"
        )
    );
    let help = check_node_instances(&app, 7, 10)
        .map(|d| d.help)
        .unwrap_or_default();
    assert!(help.contains("--max-instances-per-node"), "{help}");
}
