//! `berth certs`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use berth::certs;

use super::DEFAULT_TLS_PORT;

#[derive(Args, Debug)]
pub struct CertsArgs {
    /// DNS name or IP address clients use to reach berth (repeatable; IPs become IP SANs)
    #[arg(long = "host", value_name = "NAME", required = true)]
    pub hosts: Vec<String>,
    /// Directory for ca.crt, ca.key, server.crt and server.key
    #[arg(long, value_name = "DIR", default_value = "certs")]
    pub out: PathBuf,
    /// Replace existing files
    #[arg(long)]
    pub force: bool,
    /// Days the server certificate is valid (the CA lives at least ten years)
    #[arg(long, value_name = "N", default_value_t = certs::DEFAULT_DAYS,
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// TLS port clients will use, for the printed instructions
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_TLS_PORT)]
    pub port: u16,
}

impl CertsArgs {
    /// Generates and writes the files, then prints how to trust the CA.
    pub fn run(self) -> ExitCode {
        let written = certs::generate(&self.hosts, self.days)
            .and_then(|bundle| certs::write_bundle(&self.out, &bundle, self.force));
        match written {
            Ok(paths) => {
                println!(
                    "{}",
                    certs::trust_instructions(&paths, &self.hosts, self.port, false)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("berth: {e}");
                ExitCode::FAILURE
            }
        }
    }
}
