//! berth started in-process on a free port against a [`Fake`] upstream, with its own data dir.

use std::net::SocketAddr;
use std::time::Duration;

use berth::config::{Config, UpstreamUrl, DOCKER_HUB};
use http::Method;

use super::client::{send, wait_for, Reply};
use super::fake::Fake;

/// A berth running in-process on a free port, with its own data dir.
pub struct Berth {
    pub running: Option<berth::app::Running>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Berth {
    pub async fn start(upstream: &Fake, tweak: impl FnOnce(&mut Config)) -> Berth {
        let dir = tempfile::tempdir().unwrap();
        Berth::start_in(dir, upstream, tweak).await
    }

    pub async fn start_in(
        dir: tempfile::TempDir,
        upstream: &Fake,
        tweak: impl FnOnce(&mut Config),
    ) -> Berth {
        let mut config = Config::default();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.data_dir = dir.path().to_path_buf();
        config.shutdown_grace = berth::config::Seconds(Duration::from_secs(2));
        let up = config.upstreams.get_mut(DOCKER_HUB).unwrap();
        up.url = UpstreamUrl::parse(&upstream.url()).unwrap();
        up.response_timeout = berth::config::Seconds(Duration::from_secs(5));
        up.connect_timeout = berth::config::Seconds(Duration::from_secs(2));
        tweak(&mut config);
        config.validate().unwrap();
        let running = berth::app::start(config).await.unwrap();
        Berth {
            addr: running.addr,
            running: Some(running),
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Pulls an image whole through berth, as a client would (the manifest by `reference`,
    /// then every blob, checked), and waits for the downloads to become cache entries.
    pub async fn pull(&self, repo: &str, reference: &str, image: &super::image::Image) {
        let r = self.get(&format!("/v2/{repo}/manifests/{reference}")).await;
        assert_eq!(r.status, 200, "{repo}:{reference}: {:?}", r.body);
        for blob in image.blobs() {
            let path = format!("/v2/{repo}/blobs/{}", super::image::sha256(&blob));
            assert_eq!(self.get(&path).await.bytes(), blob, "{path}");
        }
        self.settle().await;
    }

    /// Waits until no download is running: a client has its bytes as soon as they are
    /// verified, and the blob becomes a cache entry a moment later.
    pub async fn settle(&self) {
        let app = self.running.as_ref().expect("berth is running").app.clone();
        wait_for("downloads to finish", Duration::from_secs(10), || {
            app.mirror.fetches.in_flight() == 0
        })
        .await;
    }

    pub async fn get(&self, path: &str) -> Reply {
        send(Method::GET, &self.url(path), &[]).await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        send(Method::GET, &self.url(path), headers).await
    }

    pub async fn head(&self, path: &str) -> Reply {
        send(Method::HEAD, &self.url(path), &[]).await
    }

    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        self.dir
    }
}
