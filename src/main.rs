//! The `berth` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use berth::config::{Config, ConfigError, LogFormat, UpstreamUrl};
use berth::tls_cli::{CertsArgs, TlsArgs};

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "A pull-through caching mirror for container registries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing buys nothing
enum Command {
    /// Run the mirror.
    Serve(ServeArgs),
    /// Re-hash every stored blob and check private tags; report (or, with --repair, remove)
    /// corrupt blobs and dangling tags.
    Fsck(FsckArgs),
    /// Generate a local CA and a server certificate signed by it, and print how to trust it.
    Certs(CertsArgs),
    /// Manage the users of the htpasswd file.
    #[command(subcommand)]
    User(berth::auth::UserCommand),
    /// Remove private blobs no manifest refers to, and abandoned uploads.
    Gc(berth::store::gc::GcArgs),
}

#[derive(Args)]
struct FsckArgs {
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

/// `berth fsck`: exit 0 when the store is sound (or was repaired), 1 when corruption or dangling
/// tags remain.
fn fsck(args: FsckArgs) -> ExitCode {
    let data_dir = match (&args.data_dir, &args.config) {
        (Some(d), _) => d.clone(),
        (None, Some(c)) => match Config::from_file(c) {
            Ok(c) => c.data_dir,
            Err(e) => {
                eprintln!("berth: {e}");
                return ExitCode::from(2);
            }
        },
        (None, None) => Config::default().data_dir,
    };
    let store = match berth::store::Store::open_existing(&data_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("berth: data dir {}: {e}", data_dir.display());
            return ExitCode::FAILURE;
        }
    };
    let report = match store.fsck(args.repair) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth: fsck: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (_, path) in &report.corrupt {
        let verb = if args.repair { "removed" } else { "corrupt" };
        println!("{verb}: {}", path.display());
    }
    println!(
        "checked {} blobs ({} bytes): {} corrupt{}",
        report.checked,
        report.bytes,
        report.corrupt.len(),
        if args.repair && !report.corrupt.is_empty() {
            ", removed"
        } else {
            ""
        }
    );
    // After the blobs, so that with --repair tags of manifests just removed as corrupt go too.
    let tags = match berth::store::private::PrivateStore::new(store).fsck_tags(args.repair) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("berth: fsck: tags: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (repo, tag, digest) in &tags.dangling {
        let verb = if args.repair {
            "removed dangling tag"
        } else {
            "dangling tag"
        };
        println!("{verb}: {repo}:{tag} -> {digest} (the repository does not hold that manifest)");
    }
    println!(
        "checked {} private tags: {} dangling{}",
        tags.checked,
        tags.dangling.len(),
        if args.repair && !tags.dangling.is_empty() {
            ", removed"
        } else {
            ""
        }
    );
    if args.repair || (report.corrupt.is_empty() && tags.dangling.is_empty()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file; flags given here override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Plain-HTTP listen address [default: 0.0.0.0:5000]
    #[arg(long)]
    listen: Option<String>,
    /// Where the cache and private repositories live [default: ./berth-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// URL of the default upstream (Docker Hub) [default: https://registry-1.docker.io]
    #[arg(long)]
    upstream: Option<String>,
    /// User for the default upstream (with --upstream-password-file)
    #[arg(long)]
    upstream_user: Option<String>,
    /// File holding the default upstream's password or access token
    #[arg(long)]
    upstream_password_file: Option<PathBuf>,
    /// Namespace stored locally and open to pushes (repeatable)
    #[arg(long)]
    private_ns: Vec<String>,
    /// htpasswd file (bcrypt entries) with the users who may push
    #[arg(long)]
    htpasswd: Option<PathBuf>,
    /// Log format
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    #[command(flatten)]
    tls: TlsArgs,
}

impl ServeArgs {
    fn config(&self) -> Result<Config, ConfigError> {
        let flag = |key: &str, message: String| ConfigError {
            key: format!("--{key}"),
            message,
        };
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(listen) = &self.listen {
            config.listen = listen
                .parse()
                .map_err(|e| flag("listen", format!("{listen:?}: {e}")))?;
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(url) = &self.upstream {
            config.default_upstream_config_mut().url =
                UpstreamUrl::parse(url).map_err(|e| flag("upstream", e))?;
        }
        if let Some(user) = &self.upstream_user {
            config.default_upstream_config_mut().user = Some(user.clone());
        }
        if let Some(file) = &self.upstream_password_file {
            config.default_upstream_config_mut().password_file = Some(file.clone());
        }
        if !self.private_ns.is_empty() {
            config.private_ns = self.private_ns.clone();
        }
        if let Some(h) = &self.htpasswd {
            config.htpasswd = Some(h.clone());
        }
        if let Some(f) = self.log_format {
            config.log_format = f;
        }
        self.tls.apply(&mut config)?;
        config.validate()?;
        Ok(config)
    }
}

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Fsck(args) => fsck(args),
        Command::Certs(args) => args.run(),
        Command::Serve(args) => {
            let mut config = match args.config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("berth: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logs(config.log_format);
            if let Err(e) = args.tls.apply_self_signed(&mut config) {
                eprintln!("berth: {e}");
                return ExitCode::FAILURE;
            }
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("berth: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(serve(config))
        }
        Command::User(cmd) => cmd.run(),
        Command::Gc(args) => {
            init_logs(LogFormat::Text);
            args.run()
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    let running = match berth::app::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::spawn(berth::tls_cli::reload_on_hangup(running.tls.clone()));
    let stop = running.stopper();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received");
        let _ = stop.send(true);
    });
    running.wait().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on SIGTERM, just not gracefully.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
