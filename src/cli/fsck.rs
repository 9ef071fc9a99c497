//! `berth fsck`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use berth::store::fsck;
use berth::store::private::PrivateStore;

#[derive(Args)]
pub struct FsckArgs {
    /// TOML config file (for its data_dir)
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data dir to check [default: the config's, else ./berth-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Remove corrupt blobs (so the next pull fetches them again) and dangling tags
    #[arg(long)]
    repair: bool,
}

impl FsckArgs {
    /// Exits 0 when the store is sound (or was repaired), 1 when corruption or dangling tags
    /// remain.
    pub fn run(self) -> ExitCode {
        let config = match super::load_config(self.config.as_deref()) {
            Ok(c) => c,
            Err(code) => return code,
        };
        let store = match super::open_existing_store(&config, self.data_dir) {
            Ok(s) => s,
            Err(code) => return code,
        };
        let report = match fsck(store.as_ref(), self.repair) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("berth: fsck: {e}");
                return ExitCode::FAILURE;
            }
        };
        for (area, digest) in &report.corrupt {
            let verb = if self.repair { "removed" } else { "corrupt" };
            println!("{verb}: {} {digest}", area.name());
        }
        println!(
            "checked {} blobs ({} bytes): {} corrupt{}",
            report.checked,
            report.bytes,
            report.corrupt.len(),
            if self.repair && !report.corrupt.is_empty() {
                ", removed"
            } else {
                ""
            }
        );
        // After the blobs, so that with --repair tags of manifests just removed as corrupt go
        // too.
        let tags = match PrivateStore::new(store).fsck_tags(self.repair) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("berth: fsck: tags: {e}");
                return ExitCode::FAILURE;
            }
        };
        for (repo, tag, digest) in &tags.dangling {
            let verb = if self.repair {
                "removed dangling tag"
            } else {
                "dangling tag"
            };
            println!(
                "{verb}: {repo}:{tag} -> {digest} (the repository does not hold that manifest)"
            );
        }
        println!(
            "checked {} private tags: {} dangling{}",
            tags.checked,
            tags.dangling.len(),
            if self.repair && !tags.dangling.is_empty() {
                ", removed"
            } else {
                ""
            }
        );
        if self.repair || (report.corrupt.is_empty() && tags.dangling.is_empty()) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}
