//! The baseline: nginx (Debian `nginx-light`) as the equivalent reverse proxy, from a config
//! generated into a temporary directory, pinned to a CPU or not.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use miren_tests::process::TempDir;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::load;

/// nginx's binary as Debian installs it.
pub const NGINX: &str = "/usr/sbin/nginx";

/// What the generated config contains.
#[derive(Debug, Clone)]
pub struct NginxConfig<'a> {
    /// Listener (plain HTTP).
    pub listen: SocketAddr,
    /// The single upstream server.
    pub backend: SocketAddr,
    /// One `server` block with `server_name HOST` per host; other hosts get 404.
    pub hosts: &'a [String],
    /// `worker_processes`.
    pub workers: u32,
    /// Whether to write an access log line per request (to a file in the temp dir).
    pub access_log: bool,
    /// Stream large bodies both ways as they come, like the ingress: `proxy_buffering off`,
    /// `proxy_request_buffering off`, no body size limit, and reads of at most 64 KiB (Pingora's
    /// body buffer) from either side.
    pub streaming: bool,
}

impl NginxConfig<'_> {
    /// The nginx.conf text; temp and log paths under `dir`.
    fn render(&self, dir: &Path) -> String {
        let dir = dir.display();
        let access_log = if self.access_log {
            format!("{dir}/access.log")
        } else {
            "off".to_owned()
        };
        let streaming = if self.streaming {
            "
    # Stream bodies as they arrive (no temp files), reading at most 64 KiB at a time like
    # Pingora; no body size limit.
    proxy_buffering off;
    proxy_request_buffering off;
    proxy_buffer_size 64k;
    # Unused without buffering, but nginx checks them against proxy_buffer_size.
    proxy_buffers 4 64k;
    proxy_busy_buffers_size 128k;
    client_body_buffer_size 64k;
    client_max_body_size 0;
"
        } else {
            ""
        };
        let mut conf = format!(
            r#"worker_processes {workers};
events {{
    worker_connections 4096;
}}
http {{
    access_log {access_log};
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server_names_hash_max_size 65536;
    server_names_hash_bucket_size 128;
    # No limit on requests per connection, client or upstream side (nginx's default: 1000).
    keepalive_requests 1000000;

    upstream backend {{
        server {backend};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    # The ingress generates X-Request-Id when the client sends none.
    map $http_x_request_id $miren_request_id {{
        default $http_x_request_id;
        "" $request_id;
    }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $host;
    proxy_set_header X-Request-Id $miren_request_id;
{streaming}
    server {{
        listen {listen} default_server;
        return 404 "no route for $host\n";
    }}
"#,
            workers = self.workers,
            backend = self.backend,
            listen = self.listen,
        );
        for host in self.hosts {
            let _ = writeln!(
                conf,
                "    server {{ listen {}; server_name {host}; location / {{ proxy_pass http://backend; }} }}",
                self.listen
            );
        }
        conf.push_str("}\n");
        conf
    }
}

/// A running nginx (master and workers); stopped on drop, also on panic.
#[derive(Debug)]
pub struct Nginx {
    master: Child,
    workers: Vec<u32>,
    dir: TempDir,
}

impl Nginx {
    /// Writes `config` to a temp dir and starts nginx pinned to `cpu` (or not), in the
    /// foreground; waits until its workers run and the listener accepts connections.
    ///
    /// # Errors
    /// If nginx is missing, exits early (with its error log) or does not listen in time.
    pub fn start(config: &NginxConfig<'_>, cpu: Option<usize>) -> Result<Self> {
        if !Path::new(NGINX).is_file() {
            bail!(
                "{NGINX} is missing: install the Debian package nginx-light (cargo xtask setup installs it)"
            );
        }
        let dir = TempDir::new("bench-nginx");
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config.render(dir.path())).context("writing nginx.conf")?;
        let error_log = dir.path().join("error.log");
        let master = load::pinned(NGINX, cpu)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(&error_log)
            .arg("-g")
            .arg(format!(
                "daemon off; pid {};",
                dir.path().join("nginx.pid").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let mut nginx = Self {
            master,
            workers: Vec::new(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = nginx.master.try_wait()? {
                bail!("nginx exited ({status}):\n{}", nginx.error_log());
            }
            nginx.workers = load::children(nginx.master.id());
            if nginx.workers.len() == config.workers as usize
                && std::net::TcpStream::connect(config.listen).is_ok()
            {
                return Ok(nginx);
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx did not listen on {} within 30 s:\n{}",
                    config.listen,
                    nginx.error_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The master and worker process ids.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.master.id()];
        pids.extend(&self.workers);
        pids
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let master = self.master.id();
        // SIGTERM: fast shutdown of master and workers.
        let _ = kill(Pid::from_raw(master as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.master.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Workers left behind (a master that did not stop in time) are killed by pid, if the
        // pid still names an nginx process.
        for worker in load::children(master)
            .into_iter()
            .chain(self.workers.clone())
        {
            let comm = std::fs::read_to_string(format!("/proc/{worker}/comm")).unwrap_or_default();
            if comm.trim_end() == "nginx" {
                let _ = kill(Pid::from_raw(worker as i32), Signal::SIGKILL);
            }
        }
        let _ = self.master.kill();
        let _ = self.master.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_server_block_per_host_and_a_404_default() {
        let hosts = ["a.test".to_owned(), "b.test".to_owned()];
        let conf = NginxConfig {
            listen: "127.0.0.1:8080".parse().unwrap(),
            backend: "127.0.0.1:9000".parse().unwrap(),
            hosts: &hosts,
            workers: 1,
            access_log: false,
            streaming: false,
        }
        .render(Path::new("/tmp/x"));
        assert_eq!(conf.matches("server_name ").count(), 2);
        assert!(conf.contains("server_name b.test; location / { proxy_pass http://backend; }"));
        assert!(conf.contains("listen 127.0.0.1:8080 default_server;"));
        assert!(conf.contains("server 127.0.0.1:9000;\n        keepalive 64;\n"));
        assert!(conf.contains("access_log off;"));
        assert!(!conf.contains("proxy_buffering"));
    }
}
