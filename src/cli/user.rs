//! `berth user add|remove|list`: the htpasswd file's users, and the password prompt.

use std::io::{self, BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use berth::auth::{add_user, check_user_name, parse_htpasswd, remove_user, DEFAULT_COST};
use berth::config::Config;

/// `berth user …`: manage the htpasswd file.
#[derive(Subcommand)]
pub enum UserCommand {
    /// Add a user, or change the password of an existing one (the password is read from stdin).
    Add(UserAddArgs),
    /// Remove a user.
    Remove(UserFileArgs),
    /// List the users, one per line, sorted (entries berth cannot use are named on stderr).
    List(HtpasswdArgs),
}

/// Which htpasswd file.
#[derive(Args)]
pub struct HtpasswdArgs {
    /// The htpasswd file [default: the `htpasswd` of --config]
    #[arg(long)]
    pub htpasswd: Option<PathBuf>,
    /// Config file naming the htpasswd file.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Args)]
pub struct UserFileArgs {
    /// The user name.
    pub name: String,
    #[command(flatten)]
    pub file: HtpasswdArgs,
}

#[derive(Args)]
pub struct UserAddArgs {
    #[command(flatten)]
    pub file: UserFileArgs,
    /// Read the password from stdin without prompting (as `docker login --password-stdin`).
    #[arg(long)]
    pub password_stdin: bool,
    /// bcrypt cost (4 to 31); each step doubles the time a login takes.
    #[arg(long, default_value_t = DEFAULT_COST)]
    pub cost: u32,
}

impl HtpasswdArgs {
    fn path(&self) -> Result<PathBuf, String> {
        if let Some(p) = &self.htpasswd {
            return Ok(p.clone());
        }
        Config::load(self.config.as_deref())
            .map_err(|e| e.to_string())?
            .htpasswd
            .ok_or_else(|| {
                "give --htpasswd FILE (or a config or BERTH_HTPASSWD that sets htpasswd)".into()
            })
    }
}

impl UserCommand {
    /// Exits 0 with what was done on stderr, or 1 with why not.
    pub fn run(self) -> ExitCode {
        let result = match self {
            UserCommand::Add(args) => run_add(&args),
            UserCommand::Remove(args) => run_remove(&args),
            UserCommand::List(args) => return run_list(&args),
        };
        match result {
            Ok(message) => {
                eprintln!("{message}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("berth: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

fn run_add(args: &UserAddArgs) -> Result<String, String> {
    let path = args.file.file.path()?;
    check_user_name(&args.file.name).map_err(|e| e.to_string())?;
    if !(4..=31).contains(&args.cost) {
        return Err("--cost must be between 4 and 31".into());
    }
    let password = read_password(args.password_stdin).map_err(|e| e.to_string())?;
    let existed = add_user(&path, &args.file.name, &password, args.cost)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(format!(
        "{} user {:?} in {}",
        if existed { "updated" } else { "added" },
        args.file.name,
        path.display()
    ))
}

/// Prints the users on stdout; exits 1 when the file cannot be read.
fn run_list(args: &HtpasswdArgs) -> ExitCode {
    let listed = args.path().and_then(|path| {
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
    });
    match listed {
        Ok(text) => {
            let (users, warnings) = parse_htpasswd(&text);
            for w in warnings {
                eprintln!("berth: {w}");
            }
            let mut names: Vec<&String> = users.keys().collect();
            names.sort();
            for name in names {
                println!("{name}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_remove(args: &UserFileArgs) -> Result<String, String> {
    let path = args.file.path()?;
    match remove_user(&path, &args.name) {
        Ok(true) => Ok(format!(
            "removed user {:?} from {}",
            args.name,
            path.display()
        )),
        Ok(false) => Err(format!("no user {:?} in {}", args.name, path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Reads the password: one line from stdin, or, at a terminal, twice from the terminal with
/// echo off.
fn read_password(from_stdin: bool) -> io::Result<String> {
    let stdin = io::stdin();
    if from_stdin || !stdin.is_terminal() {
        // Not rpassword's read_password_from_bufread: that refuses a password without a final
        // newline (`printf %s "$PW" | berth user add …`).
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    let first = rpassword::prompt_password("Password: ")?;
    let second = rpassword::prompt_password("Repeat the password: ")?;
    if first != second {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the passwords differ",
        ));
    }
    Ok(first)
}
