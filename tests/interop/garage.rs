//! Garage, a real S3-compatible object store, as the bucket berth's S3 backend is tested
//! against: one single-node server per test on free 127.0.0.1 ports, its data in a temp dir,
//! its bucket and key made at start (`--default-bucket`), stopped when dropped.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::procs::{find_tool, free_port, wait_for, Proc};

pub const BUCKET: &str = "berth";
pub const KEY_ID: &str = "GK31c2f218a2e44f485b94239e";
pub const SECRET: &str = "b892c0665f0ada8a4755dae98baa3b133590e11ae3bcc1f9d2d5f01e0d7c0f56";
pub const REGION: &str = "garage";

pub struct Garage {
    pub addr: SocketAddr,
    proc: Option<Proc>,
    config: std::path::PathBuf,
    dir: TempDir,
}

impl Garage {
    pub fn start() -> Garage {
        let dir = tempfile::tempdir().expect("create garage's temp dir");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n[s3_api]\ns3_region = \"{REGION}\"\n\
                 api_bind_addr = \"{addr}\"\n",
                meta = dir.path().join("meta").display(),
                data = dir.path().join("data").display(),
                rpc = free_port(),
                secret = "4".repeat(64),
            ),
        )
        .expect("write garage's config");
        let mut g = Garage {
            addr,
            proc: None,
            config,
            dir,
        };
        g.run();
        g
    }

    fn run(&mut self) {
        let garage = find_tool(
            "garage",
            "garage (cargo install garage --locked --version 2.5.0)",
        );
        let mut cmd = Command::new(garage);
        cmd.arg("-c")
            .arg(&self.config)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", KEY_ID)
            .env("GARAGE_DEFAULT_SECRET_KEY", SECRET)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "warn");
        let log = self.dir.path().join("garage.log");
        self.proc = Some(Proc::spawn("garage", &mut cmd, &log, &log));
        // Ready when the bucket answers a signed listing (the key and bucket are made a moment
        // after the port opens).
        let url = self.url();
        wait_for("garage's bucket", Duration::from_secs(30), || {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .args(["--aws-sigv4", &format!("aws:amz:{REGION}:s3")])
                .args(["--user", &format!("{KEY_ID}:{SECRET}")])
                .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
                .arg(format!("{url}/{BUCKET}?list-type=2"))
                .output()
                .ok()?;
            (out.stdout == b"200").then_some(())
        });
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server (its data stays); `restart` brings it back on the same port.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// The `[storage]` table of a berth config for this bucket.
    pub fn storage_toml(&self, prefix: &str, extra: &str) -> String {
        format!(
            "[storage]\nbackend = \"s3\"\nbucket = \"{BUCKET}\"\nendpoint = \"{}\"\n\
             region = \"{REGION}\"\nprefix = \"{prefix}\"\nallow_http = true\n\
             credentials_file = \"{}\"\n{extra}",
            self.url(),
            self.credentials_file().display()
        )
    }

    /// An AWS shared-credentials file with the bucket's key.
    pub fn credentials_file(&self) -> std::path::PathBuf {
        let path = self.dir.path().join("credentials");
        if !path.exists() {
            std::fs::write(
                &path,
                format!(
                    "[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"
                ),
            )
            .expect("write the credentials file");
        }
        path
    }
}
