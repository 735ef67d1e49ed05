//! The floor of any proxy built on Pingora 0.9.1: Pingora's own server (one thread, its
//! single-threaded runtime, mimalloc like the agent) with a `ProxyHttp` that only names the
//! backend (no routing, headers, log or metrics). It runs as
//! `miren-bench pingora-floor LISTEN BACKEND` in a process of its own, pinned to the proxy
//! CPU like the agent, so its row shows how much of the ingress's cost is Pingora's.

use std::{
    net::SocketAddr,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use async_trait::async_trait;
use pingora::{
    prelude::HttpPeer,
    proxy::{ProxyHttp, Session, http_proxy_service},
    server::{Server, configuration::ServerConf},
};

use super::{HOST, PROXY_CPU, http_get};

/// Proxies every request to one backend.
struct Floor {
    backend: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.backend, false, String::new())))
    }
}

/// Serves `listen` → `backend` until killed (`miren-bench pingora-floor LISTEN BACKEND`).
pub fn serve(listen: SocketAddr, backend: SocketAddr) -> ! {
    let conf = ServerConf {
        threads: 1,
        // One single-threaded runtime, like each of the agent's ingress threads.
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(&server.configuration, Floor { backend });
    service.add_tcp(&listen.to_string());
    server.add_service(service);
    server.run_forever()
}

/// The floor proxy in its own process on [`PROXY_CPU`]; killed on drop.
#[derive(Debug)]
pub struct FloorProcess {
    child: Child,
    listen: SocketAddr,
}

impl FloorProcess {
    /// Starts it on `listen` and waits until it answers through to `backend`.
    pub fn start(listen: SocketAddr, backend: SocketAddr) -> Result<Self> {
        let child = Command::new("taskset")
            .args(["-c", &PROXY_CPU.to_string()])
            .arg(std::env::current_exe()?)
            .args(["pingora-floor", &listen.to_string(), &backend.to_string()])
            .spawn()
            .context("starting the Pingora floor proxy")?;
        let mut floor = Self { child, listen };
        let started = Instant::now();
        while http_get(listen, HOST).ok().map(|(status, _)| status) != Some(200) {
            if let Some(status) = floor.child.try_wait()? {
                bail!("the Pingora floor proxy exited ({status}) before answering");
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("the Pingora floor proxy on {listen} did not answer 200 within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(floor)
    }

    /// Where it listens.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for FloorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
