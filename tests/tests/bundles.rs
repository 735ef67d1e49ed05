//! App code travels with the deploy: `miren deploy DIR` uploads DIR as a content-addressed
//! bundle (without `.git`) and instances run from the agent's unpacked copy, so editing or
//! deleting DIR afterwards changes nothing, also for a restarted instance; the same content
//! deployed from another copy is not uploaded again; without its unpacked bundle on the node
//! an instance does not start and `miren app show` says why. Bundles over the agent's limit,
//! bytes that do not match their hash and deploys naming a bundle the agent lacks are refused
//! with messages saying so. Real agent, CLI, runc, clients.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use miren_agent::api::types::ErrorBody;
use miren_tests::{
    apps::{
        self, HttpClient, endpoints, kill9_netns, sandbox_netns, wait_until_logging, web_app_toml,
    },
    ingress::ok,
    process::AgentProcess,
    world::{Plane, World},
};

/// How long to wait for the agent or an instance to get somewhere.
const WAIT: Duration = Duration::from_secs(60);

/// Requests to the ingress: a response may take as long as an instance start.
const HTTP: HttpClient = HttpClient {
    connect_timeout: None,
    read_timeout: Duration::from_secs(60),
};

/// Lists its code, then serves it (`/data.txt`).
const SERVE_APP: &str = "ls -A /app; exec python3 -m http.server $PORT";

/// `GET /data.txt` through the ingress.
fn data(world: &World) -> (u16, String) {
    HTTP.get_via_ingress(world, "files.test", "/data.txt")
}

/// Times the agent logged that it received a bundle.
fn uploads(agent: &AgentProcess) -> usize {
    agent
        .log_text()
        .matches("received an app code bundle")
        .count()
}

#[test]
fn instances_run_from_the_bundle_whatever_happens_to_the_directory() {
    let world = World::new(0);
    let mut agent = world.start_agent_running_sandboxes(Plane::Nft, &[]);
    let toml = web_app_toml("files", SERVE_APP);
    let files = [
        ("data.txt", "original\n"),
        (".git/HEAD", "ref: refs/heads/main\n"),
    ];
    let first = world.dir().join("first");
    std::fs::create_dir_all(first.join("files/.git")).unwrap();
    let app_dir = apps::deploy(&first, &agent, "files", &toml, &files);
    ok(&agent, &["route", "set", "files.test", "files"]);
    wait_until_logging(&agent, "the original data", WAIT, || {
        data(&world) == (200, "original\n".into())
    });
    assert_eq!(uploads(&agent), 1);
    // The instance sees the bundle: the app's files without .git (`.miren` without app.toml).
    let listing = ok(&agent, &["logs", "files"]);
    assert!(
        listing.contains(" | .miren\n") && listing.contains(" | data.txt\n"),
        "{listing}"
    );
    assert!(!listing.contains(".git\n"), "{listing}");
    // The agent's copy: one blob and its tree, private to the agent.
    let bundles = world.dir().join("state/bundles");
    let trees: Vec<String> = std::fs::read_dir(&bundles)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.len() == 64)
        .collect();
    assert_eq!(trees.len(), 1, "{trees:?}");
    assert!(bundles.join(format!("{}.tar", trees[0])).is_file());
    assert_eq!(
        std::fs::read_to_string(bundles.join(&trees[0]).join("data.txt")).unwrap(),
        "original\n"
    );
    // The app.toml travels in the deploy, not in the bundle.
    assert!(!bundles.join(&trees[0]).join(".miren/app.toml").exists());

    // Editing, then deleting the directory changes nothing.
    std::fs::write(app_dir.join("data.txt"), "edited\n").unwrap();
    assert_eq!(data(&world), (200, "original\n".into()));
    std::fs::remove_dir_all(&app_dir).unwrap();
    assert_eq!(data(&world), (200, "original\n".into()));

    // A restarted instance runs from the bundle too.
    let before = endpoints(&agent, "files", "web", "http");
    assert_eq!(before.len(), 1);
    kill9_netns(&sandbox_netns(agent.pid(), before[0].ip()));
    wait_until_logging(&agent, "a new instance serving the bundle", WAIT, || {
        let now = endpoints(&agent, "files", "web", "http");
        now.len() == 1 && now != before && data(&world) == (200, "original\n".into())
    });

    // The same content from another copy: nothing uploaded, the instance kept.
    let running = endpoints(&agent, "files", "web", "http");
    let second = world.dir().join("second");
    std::fs::create_dir_all(second.join("files/.git")).unwrap();
    apps::deploy(&second, &agent, "files", &toml, &files);
    assert_eq!(uploads(&agent), 1);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(endpoints(&agent, "files", "web", "http"), running);

    // New content: a new bundle, and the instance replaced by one serving it.
    let third = world.dir().join("third");
    apps::deploy(&third, &agent, "files", &toml, &[("data.txt", "third\n")]);
    assert_eq!(uploads(&agent), 2);
    wait_until_logging(&agent, "the third data", WAIT, || {
        data(&world) == (200, "third\n".into())
    });

    // Without its unpacked tree on the node, an instance does not start, and says why.
    let third_bundle = std::fs::read_dir(&bundles)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|name| name.len() == 64 && *name != trees[0])
        .expect("the third bundle's tree");
    std::fs::remove_dir_all(bundles.join(&third_bundle)).unwrap();
    let running = endpoints(&agent, "files", "web", "http");
    kill9_netns(&sandbox_netns(agent.pid(), running[0].ip()));
    let expected = format!(
        "cannot start instances: the app's code bundle {} is not on this node",
        &third_bundle[..12]
    );
    wait_until_logging(&agent, "the missing bundle in app show", WAIT, || {
        ok(&agent, &["app", "show", "files"]).contains(&expected)
    });
    agent.terminate(Duration::from_secs(20));
}

/// One raw request on the API socket: the request line `head` with `Content-Length: length`
/// (or chunked encoding when `None`), a JSON body type for a POST, and `body`, written until
/// the agent stops reading: (status, body).
fn api(socket: &Path, head: &str, length: Option<u64>, body: &[u8]) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).expect("connect to the API");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let framing = match length {
        Some(length) => format!("Content-Length: {length}"),
        None => "Transfer-Encoding: chunked".to_owned(),
    };
    let kind = if head.starts_with("POST") {
        "application/json"
    } else {
        "application/x-tar"
    };
    let head = format!(
        "{head} HTTP/1.1\r\nHost: agent\r\nContent-Type: {kind}\r\n{framing}\r\nConnection: close\r\n\r\n"
    );
    // The agent may answer (and close) before it has read everything.
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body));
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    (head[9..12].parse().expect("a status code"), body.to_owned())
}

/// The message of an [`ErrorBody`] answer with `status`.
fn error(answer: (u16, String), status: u16) -> String {
    assert_eq!(answer.0, status, "{}", answer.1);
    serde_json::from_str::<ErrorBody>(&answer.1)
        .expect("a JSON error body")
        .error
}

#[test]
fn bundles_over_the_limit_or_unlike_their_hash_are_refused() {
    let world = World::new(0);
    let agent = world.start_agent(Plane::Nft);
    let socket = world.dir().join("agent.sock");
    let zeros = "0".repeat(64);

    // The CLI refuses a directory over the agent's limit before reading it, naming the limit
    // and the biggest files; nothing is deployed.
    let big = apps::write_app(
        world.dir(),
        "big",
        &web_app_toml("big", SERVE_APP),
        &[("small.txt", "x\n")],
    );
    std::fs::File::create(big.join("disk.img"))
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let out = agent.miren(&["deploy", big.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("over the limit of 256 MiB"), "{stderr}");
    assert!(stderr.contains("300 MiB  disk.img\n"), "{stderr}");
    assert!(stderr.contains("2 B  small.txt\n"), "{stderr}");
    assert!(ok(&agent, &["apps"]).contains("no apps"));

    // The API: a hash that is not one, bytes that are not what their hash says, a bundle
    // over the limit (announced, or found out while reading), one the agent lacks.
    let text = error(api(&socket, "PUT /v1/bundles/xyz", Some(2), b"hi"), 400);
    assert!(text.contains("64 hex digits"), "{text}");
    let put_zeros = format!("PUT /v1/bundles/{zeros}");
    let text = error(api(&socket, &put_zeros, Some(5), b"hello"), 400);
    assert!(text.contains(&format!("not {zeros}")), "{text}");
    assert!(text.contains("upload it again"), "{text}");
    let text = error(api(&socket, &put_zeros, Some(300 << 20), b""), 413);
    assert!(text.contains("limit of 256 MiB"), "{text}");
    let chunk = vec![b'x'; 1 << 20];
    let mut chunked = Vec::new();
    for _ in 0..300 {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let text = error(api(&socket, &put_zeros, None, &chunked), 413);
    assert!(text.contains("limit of 256 MiB"), "{text}");
    let leftovers = std::fs::read_dir(world.dir().join("state/bundles/tmp"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0);
    let text = error(
        api(&socket, &format!("GET /v1/bundles/{zeros}"), Some(0), b""),
        404,
    );
    assert!(text.contains("upload it first"), "{text}");
    let deploy = format!(
        r#"{{"source_name":"x/.miren/app.toml","toml":"name = \"x\"\n","bundle":"{zeros}"}}"#
    );
    let text = error(
        api(
            &socket,
            "POST /v1/apps",
            Some(deploy.len() as u64),
            deploy.as_bytes(),
        ),
        400,
    );
    assert!(
        text.contains(&format!("no bundle {zeros}")) && text.contains("upload it first"),
        "{text}"
    );

    // Within the limit it goes through, and the agent then has it.
    std::fs::remove_file(big.join("disk.img")).unwrap();
    ok(&agent, &["deploy", big.to_str().unwrap()]);
    let status: serde_json::Value =
        serde_json::from_str(&ok(&agent, &["status", "--output", "json"])).unwrap();
    assert_eq!(status["max_bundle_bytes"], 256 << 20);
    assert!(ok(&agent, &["apps"]).contains("big"));
}
