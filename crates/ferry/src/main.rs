//! `ferry`: the command line of Ferry, live migration of KVM virtual machines.

mod ca;
mod cli;
mod cluster;
mod ctl;
mod evc;
mod hostcmd;
mod hostctl;
mod logfile;
mod migrate;
mod migrations;
mod run;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let started_ns = ferry_vmm::monotonic_ns();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors.
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // Point at the help of the command that was meant, if one was named.
            let args: Vec<String> = std::env::args().skip(1).collect();
            // The first word that is not an option nor the value of --log-level.
            let command = args
                .iter()
                .enumerate()
                .find(|(i, a)| !a.starts_with('-') && (*i == 0 || args[i - 1] != "--log-level"))
                .map(|(_, a)| a.clone());
            let help = match command {
                Some(c) if <cli::Cli as clap::CommandFactory>::command().find_subcommand(&c).is_some() => {
                    format!("ferry {c} --help")
                }
                _ => "ferry --help".to_string(),
            };
            eprintln!("ferry: error: {} (see '{help}')", one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    init_logging(&cli.log_level);
    if !matches!(cli.command, cli::Command::Run(_) | cli::Command::Restore(_) | cli::Command::Receive(_)) {
        logfile::off();
        // A report piped into `head` ends the command quietly, as with any Unix tool,
        // instead of a panic on a failed print. (VMM processes keep ignoring SIGPIPE:
        // there a closed socket is an error to handle, not a reason to die.)
        // SAFETY: resetting a signal's disposition to the default has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        cli::Command::Run(args) => run::run(args, started_ns),
        cli::Command::Restore(args) => run::restore(args, started_ns),
        cli::Command::Info(args) => ctl::info(args),
        cli::Command::Pause(args) => ctl::pause(args),
        cli::Command::Resume(args) => ctl::resume(args),
        cli::Command::Snapshot(args) => ctl::snapshot(args),
        cli::Command::Guests(args) => run::guests(args),
        cli::Command::Receive(args) => run::receive(args, started_ns),
        cli::Command::Migrate(args) => migrate::migrate(args),
        cli::Command::MigrateCancel(args) => migrate::cancel(args),
        cli::Command::Home(args) => ctl::home(args),
        cli::Command::Host(cmd) => hostcmd::host(cmd),
        cli::Command::Vm(args) => hostcmd::vm(args),
        cli::Command::Ca(args) => ca::run(args),
        cli::Command::Cluster(cmd) => cluster::run(cmd),
        cli::Command::Migrations(args) => migrations::run(args),
    };
    logfile::finish(std::time::Duration::from_secs(2));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Folds clap's multi-line message into one line, without the usage block.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Logs go to stderr and, for a VMM process, to its file in the VM's home
/// ([`logfile`]); the file gets no colours and always the time.
fn init_logging(level: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        // A closed stderr (a supervisor that stopped reading) must not panic the VMM.
        .log_internal_errors(false);
    let file = tracing_subscriber::fmt::layer()
        .with_writer(logfile::Writer)
        .with_ansi(false)
        .with_target(false)
        .log_internal_errors(false);
    let _ = tracing_subscriber::registry().with(filter).with(stderr).with(file).try_init();
}
