//! `berth gc`: the command-line front of [`berth::store::gc::collect`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use berth::config::{human_bytes, LogFormat, Seconds};
use berth::store::gc::{collect, GcOptions};

#[derive(Args)]
pub struct GcArgs {
    /// TOML config file (for data_dir and upload_max_age).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The data dir [default: data_dir of --config, else ./berth-data]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Show what would be removed without removing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep unreferenced blobs written or linked less than this long ago (`0s`, `10m`, `1h`):
    /// they may belong to a push whose manifest has not arrived yet. `0s` reclaims the space of
    /// a delete at once, but is safe only while nobody pushes.
    #[arg(long, value_parser = Seconds::parse, default_value = "1h")]
    pub grace: Seconds,
}

impl GcArgs {
    /// Exits 2 on a bad config file, 1 when the store cannot be read or changed.
    pub fn run(self) -> ExitCode {
        super::init_logs(LogFormat::Text);
        let config = match super::load_config(self.config.as_deref()) {
            Ok(c) => c,
            Err(code) => return code,
        };
        let store = match super::open_existing_store(&config, self.data_dir.clone()) {
            Ok(s) => s,
            Err(code) => return code,
        };
        let mut opts = GcOptions::new(config.upload_max_age.0);
        opts.dry_run = self.dry_run;
        opts.blob_min_age = self.grace.0;
        let report = match collect(&store, &opts) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("berth: gc: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (verb, freed) = if self.dry_run {
            ("would remove", "would be freed")
        } else {
            ("removed", "freed")
        };
        for (d, size) in &report.blobs {
            println!("{verb} blob {d} ({size} bytes)");
        }
        for (id, size) in &report.uploads {
            println!("{verb} upload {id} ({size} bytes)");
        }
        println!(
            "{verb} {} blob(s), {} abandoned upload(s), {} dangling link(s); {} {freed} ({} bytes); kept {} referenced and {} recent unreferenced blob(s) (--grace {})",
            report.blobs.len(),
            report.uploads.len(),
            report.links,
            human_bytes(report.bytes_freed),
            report.bytes_freed,
            report.kept_referenced,
            report.kept_recent,
            humantime(self.grace.0),
        );
        ExitCode::SUCCESS
    }
}

/// `1h`, `90s`, `250ms`: the grace period as the user would write it.
fn humantime(d: Duration) -> String {
    let (secs, ms) = (d.as_secs(), d.subsec_millis());
    if ms != 0 {
        format!("{}ms", d.as_millis())
    } else if secs != 0 && secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if secs != 0 && secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_periods_for_people() {
        let d = |s| humantime(Seconds::parse(s).unwrap().0);
        assert_eq!(d("1h"), "1h");
        assert_eq!(d("0s"), "0s");
        assert_eq!(d("90s"), "90s");
        assert_eq!(d("10m"), "10m");
        assert_eq!(d("250ms"), "250ms");
    }
}
