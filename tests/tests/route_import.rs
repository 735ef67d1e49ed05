//! `miren route import` with the real agent and ingress: a file with errors changes nothing and
//! lists every bad line; a valid file of 1,000 routes is served; routes set and removed one
//! by one still reach the ingress (applied as changes, not rebuilds).

use miren_tests::ingress::{Backend, BackendMode, IngressWorld, ok};

/// The backend name a 200 response came from.
fn served_by(world: &IngressWorld, host: &str) -> String {
    let response = world.get(host, "/", &[]);
    assert_eq!(response.status, 200, "{host}: {response:?}");
    response.body
}

#[test]
fn import_is_all_or_nothing_and_one_by_one_changes_reach_the_ingress() {
    let world = IngressWorld::new("routeimport");
    let agent = world.start_agent(&[]);
    let (shop, blog) = (
        Backend::start(&world.ns, "shop", BackendMode::Normal),
        Backend::start(&world.ns, "blog", BackendMode::Normal),
    );
    for (app, backend) in [("shop", &shop), ("blog", &blog)] {
        world.deploy_web(&agent, app);
        world.set_endpoints(app, &[backend.addr]);
    }

    // Every bad line is reported with its number, and nothing is applied.
    let bad = world.dir().join("bad-routes.txt");
    std::fs::write(
        &bad,
        "# routes\nok.example.com shop\nnohost\nx.example.com nosuchapp\n\
         y.example.com shop web 0s\nok.example.com blog\nz.example.com shop nosuchservice\n",
    )
    .unwrap();
    let out = agent.miren(&["route", "import", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let file = bad.display();
    for expected in [
        format!("{file}:3: expected `HOST APP [SERVICE] [TIMEOUT]`, found 1 fields"),
        format!("{file}:5: \"0s\" is not a timeout"),
        format!("{file}:6: host ok.example.com is already routed on line 2"),
        format!("nothing was imported: fix the 3 line(s) above and import {file} again"),
    ] {
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }
    // Syntax is fine now; the agent names the lines whose app or service does not exist.
    std::fs::write(
        &bad,
        "ok.example.com shop\nx.example.com nosuchapp\nz.example.com shop nosuchservice\n",
    )
    .unwrap();
    let out = agent.miren(&["route", "import", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{file}:2: no app named \"nosuchapp\"")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}:3: app \"shop\" has no service \"nosuchservice\""
        )),
        "{err}"
    );
    assert_eq!(
        ok(&agent, &["--output", "json", "route", "list"]).trim(),
        "[]"
    );
    assert_eq!(world.get("ok.example.com", "/", &[]).status, 404);

    // 1,000 routes in one import, all served.
    let good = world.dir().join("routes.txt");
    let mut text = String::from("# generated\n\n");
    for i in 0..1000 {
        let app = if i % 2 == 0 { "shop" } else { "blog" };
        text.push_str(&format!("h{i}.example.com {app}\n"));
    }
    text.push_str("*.wild.example.com blog web 30s\n");
    std::fs::write(&good, text).unwrap();
    let out = ok(&agent, &["route", "import", good.to_str().unwrap()]);
    assert!(
        out.contains("imported 1001 routes") && out.contains("0 replaced"),
        "{out}"
    );
    for (host, app) in [
        ("h0.example.com", "shop"),
        ("h1.example.com", "blog"),
        ("h500.example.com", "shop"),
        ("h999.example.com", "blog"),
        ("any.wild.example.com", "blog"),
    ] {
        assert_eq!(served_by(&world, host), app, "{host}");
    }
    let listed = ok(&agent, &["route", "list"]);
    assert!(listed.contains("*.wild.example.com"), "{listed}");
    assert!(listed.contains("30s"), "{listed}");

    // One by one: a new route, a changed one and a removed one take effect at once.
    world.route(&agent, "new.example.com", "shop", &[]);
    assert_eq!(served_by(&world, "new.example.com"), "shop");
    world.route(&agent, "h0.example.com", "blog", &[]);
    assert_eq!(served_by(&world, "h0.example.com"), "blog");
    ok(&agent, &["route", "rm", "h1.example.com"]);
    assert_eq!(world.get("h1.example.com", "/", &[]).status, 404);
    assert_eq!(served_by(&world, "h2.example.com"), "shop");

    // Importing again replaces the routes of the same hosts.
    let out = ok(&agent, &["route", "import", good.to_str().unwrap()]);
    assert!(out.contains("(1000 replaced"), "{out}");
    assert_eq!(served_by(&world, "h0.example.com"), "shop");
    assert_eq!(served_by(&world, "h1.example.com"), "blog");
}
