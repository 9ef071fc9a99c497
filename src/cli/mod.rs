//! The command line: clap's definitions, the prompts, and what each command prints. The work
//! they start lives in the library: [`berth::app`], [`berth::store`], [`berth::auth`],
//! [`berth::certs`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use berth::config::{Config, LogFormat};

mod cache;
mod certs;
mod client;
mod fsck;
mod gc;
mod serve;
mod user;
mod warm;

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "A pull-through caching mirror for container registries"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing buys nothing
pub enum Command {
    /// Run the mirror.
    #[command(
        after_help = "Flags cover the common settings. Every setting, including those only a \
                      config file takes (limits, rate limits, upstreams, storage, webhooks, \
                      CORS, ...), is documented in the README's \"Configuration\" section and \
                      in the annotated deploy/berth.toml; the man pages are in deploy/man/. \
                      Every setting can also be given as a BERTH_* environment variable \
                      (BERTH_MAX_CACHE_SIZE, BERTH_LIMITS__IDLE_TIMEOUT, ...): variables \
                      override the file, flags override both."
    )]
    Serve(serve::ServeArgs),
    /// Re-hash every stored blob and check private tags; report (or, with --repair, remove)
    /// corrupt blobs and dangling tags.
    Fsck(fsck::FsckArgs),
    /// Generate a local CA and a server certificate signed by it, and print how to trust it.
    Certs(certs::CertsArgs),
    /// Manage the users of the htpasswd file.
    #[command(subcommand)]
    User(user::UserCommand),
    /// Remove private blobs no manifest refers to, and abandoned uploads.
    Gc(gc::GcArgs),
    /// Pull images through a running berth, as a client would, so they are in its cache before
    /// anyone needs them.
    Warm(warm::WarmArgs),
    /// Inspect the mirror cache (ls, du) and purge from it (rm).
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Print the man page of berth (or of one of its commands) in roff, as shipped in
    /// deploy/man/.
    #[command(hide = true)]
    Man {
        /// The command whose page to print (serve, fsck, certs, user, gc, warm, cache)
        command: Option<String>,
    },
}

/// `berth man [COMMAND]`: the page clap_mangen makes from the command-line definitions.
pub fn man(command: Option<&str>) -> std::process::ExitCode {
    use clap::CommandFactory;
    let top = Cli::command();
    let page = match command {
        None => top,
        Some(name) => match top.find_subcommand(name) {
            Some(sub) => sub
                .clone()
                .display_name(format!("berth-{name}"))
                .bin_name(format!("berth {name}")),
            None => {
                eprintln!("berth: man: no command {name:?}");
                return std::process::ExitCode::from(2);
            }
        },
    };
    let mut out = Vec::new();
    if let Err(e) = clap_mangen::Man::new(page).render(&mut out) {
        eprintln!("berth: man: {e}");
        return std::process::ExitCode::FAILURE;
    }
    use std::io::Write;
    match std::io::stdout().write_all(&out) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

/// The TLS port used when a certificate is given without `--tls-listen`, and the one `berth
/// certs` names in its instructions unless told another.
pub const DEFAULT_TLS_PORT: u16 = 5443;

/// The config of `--config` (or the defaults) with the `BERTH_*` variables applied. A file that does not load is
/// reported on stderr, and the command exits with 2, as for a bad flag.
fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("berth: {e}");
        ExitCode::from(2)
    })
}

/// The store a tool (`fsck`, `gc`) works on beside a running server: the configured backend,
/// with `data_dir` (the flag's, else the config's) as its data dir; nothing in progress is
/// removed.
fn open_existing_store(
    config: &Config,
    data_dir: Option<PathBuf>,
) -> Result<berth::store::Store, ExitCode> {
    let mut config = config.clone();
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    berth::app::open_existing_store(&config).map_err(|e| {
        eprintln!("berth: {e}");
        ExitCode::FAILURE
    })
}

/// Logs to stderr, filtered by `BERTH_LOG` (default `info`).
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
