//! `ferry ca`: the cluster CA and the certificates it issues (files in docs/security.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use ferry_pki::Kind;

/// The long help of `ferry ca`.
pub const CA_ABOUT: &str = "\
Create the cluster's certificate authority and issue host and client certificates.

Every TCP port of Ferry speaks TLS with mutual authentication: a host presents a host
certificate, the CLI a client certificate, and each side accepts only certificates from the
cluster CA. The files are described in docs/security.md.

Example:
  ferry ca init --dir /etc/ferry/ca
  ferry ca issue --ca /etc/ferry/ca --name host-a --kind host --san 10.0.0.1 --out /etc/ferry/host
  ferry ca issue --ca /etc/ferry/ca --name alice --kind client --out ~/.config/ferry/identity";

/// Arguments of `ferry ca`.
#[derive(Debug, Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

/// `ferry ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new cluster CA: DIR/ca.pem and DIR/ca.key (mode 0600); never overwrites.
    Init(InitArgs),
    /// Issue a host or client certificate: OUT/cert.pem, OUT/key.pem (0600), OUT/ca.pem.
    Issue(IssueArgs),
}

/// Arguments of `ferry ca init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory of the CA (created if missing).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Print what was written as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `ferry ca issue`.
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Directory of the CA (with ca.pem and ca.key).
    #[arg(long, value_name = "DIR")]
    pub ca: PathBuf,
    /// The host's or client's name (the certificate's CN).
    #[arg(long)]
    pub name: String,
    /// host (a daemon: serves and calls other hosts) or client (the CLI, a controller).
    #[arg(long, value_name = "host|client")]
    pub kind: Kind,
    /// An extra subject alternative name (DNS name or IP address); repeatable. A host
    /// certificate always has its name, localhost, 127.0.0.1, ::1 and this machine's host name.
    #[arg(long = "san", value_name = "DNS_OR_IP")]
    pub sans: Vec<String>,
    /// Directory for cert.pem, key.pem and ca.pem (created if missing, mode 0700).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Print what was written as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ferry ca ...`.
pub fn run(args: CaArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        CaCommand::Init(a) => init(a),
        CaCommand::Issue(a) => issue(a),
    }
}

fn init(args: InitArgs) -> anyhow::Result<ExitCode> {
    let files = ferry_pki::init_ca(&args.dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&files)?);
    } else {
        println!("CA:          {}", files.common_name);
        println!("certificate: {}", files.cert.display());
        println!("key:         {} (mode 0600: keep it secret, ideally offline)", files.key.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn issue(args: IssueArgs) -> anyhow::Result<ExitCode> {
    let files = match args.kind {
        Kind::Host => ferry_pki::issue_host(&args.ca, &args.name, &args.sans, &args.out)?,
        Kind::Client => {
            let request = ferry_pki::IssueRequest { name: args.name, kind: Kind::Client, sans: args.sans };
            ferry_pki::issue(&args.ca, &request, &args.out)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&files)?);
    } else {
        println!("{} certificate for {}", files.kind, files.name);
        println!("certificate: {}", files.cert.display());
        println!("key:         {} (mode 0600)", files.key.display());
        println!("CA:          {}", files.ca.display());
        if !files.sans.is_empty() {
            println!("names:       {}", files.sans.join(", "));
        }
    }
    Ok(ExitCode::SUCCESS)
}
